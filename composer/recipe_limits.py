"""Bounds on a recipe's YAML, checked on the parser's event stream before anything is composed or built: nesting
depth, entries per list, values after alias expansion ("billion laughs"), and keys that are not names."""
from __future__ import annotations

import yaml

from composer.errors import RecipeError

# A real recipe nests about a dozen levels (document, slices, a slice, sources, a source, parameters, a parameter,
# a filter list, an entry, its value list) and holds a few thousand values; mergekit's largest examples hold
# a few hundred. The bounds are far above that and far below what costs time or memory.
MAX_DEPTH = 64  # nested lists and mappings
MAX_LIST = 10_000  # entries in one list (a gradient has one per few layers; a model has at most a few hundred)
MAX_VALUES = 1_000_000  # scalars, lists and mappings, counting every alias as a copy of what it names

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"  # `<<: *defaults`


class _Open:
    __slots__ = ("mapping", "children", "size", "anchor")

    def __init__(self, mapping: bool, anchor: str | None) -> None:
        self.mapping, self.children, self.size, self.anchor = mapping, 0, 1, anchor


def check_limits(text: str, path: str) -> None:
    """Refuse recipe text that nests deeper than MAX_DEPTH, has a list longer than MAX_LIST, expands (through
    aliases) to more than MAX_VALUES values, aliases a node inside itself, or has a key that is not a name.
    Reads the parser's events one at a time (the parser, unlike the composer, does not recurse), so it stops at
    the first excess without building anything. YAML syntax errors are left for the composer to report."""
    resolver = yaml.resolver.Resolver()
    stack: list[_Open] = []
    sizes: dict[str, int] = {}  # anchor -> expanded size of the finished node
    total = 0

    def where(event: yaml.Event) -> str:
        return f"{path}:{event.start_mark.line + 1}"

    def add(size: int, event: yaml.Event) -> None:
        nonlocal total
        if stack:
            parent = stack[-1]
            parent.children += 1
            parent.size += size
            if not parent.mapping and parent.children > MAX_LIST:
                raise RecipeError(f"{where(event)}: a list with more than {MAX_LIST:,} entries: composer reads at "
                                  f"most {MAX_LIST:,} (a gradient needs a few, one per layer at most)")
        else:
            total += size
        if total + sum(o.size for o in stack) > MAX_VALUES:
            raise RecipeError(f"{where(event)}: the recipe expands to more than {MAX_VALUES:,} values (aliases "
                              "included): it is not a recipe; write it without nested aliases")

    def check_key(event: yaml.Event) -> None:
        parent = stack[-1] if stack else None
        if parent is None or not parent.mapping or parent.children % 2:
            return  # not in a key's position
        if isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
            if tag in (_STR, _MERGE):
                return
            kind = tag.rsplit(":", 1)[-1]
            raise RecipeError(f"{where(event)}: key {event.value or 'null'} is a YAML {kind}, not a name: keys are "
                              f"names such as merge_method (quote it, \"{event.value}\", if it is one)")
        kind = "an alias" if isinstance(event, yaml.AliasEvent) else (
            "a list" if isinstance(event, yaml.SequenceStartEvent) else "a mapping")
        raise RecipeError(f"{where(event)}: a key is {kind}, not a name: keys are names such as merge_method")

    try:
        for event in yaml.parse(text):
            if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)):
                check_key(event)
            if isinstance(event, yaml.ScalarEvent):
                if event.anchor:
                    sizes[event.anchor] = 1
                add(1, event)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in sizes:
                    if any(o.anchor == event.anchor for o in stack):
                        raise RecipeError(f"{where(event)}: alias *{event.anchor} refers to a value that contains "
                                          "it: a recipe cannot be recursive")
                    return  # an undefined alias: the composer reports it
                add(sizes[event.anchor], event)
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(stack) >= MAX_DEPTH:
                    raise RecipeError(f"{where(event)}: nested more than {MAX_DEPTH} levels deep: a recipe nests "
                                      "about ten")
                stack.append(_Open(isinstance(event, yaml.MappingStartEvent), event.anchor))
            elif isinstance(event, yaml.CollectionEndEvent):
                done = stack.pop()
                if done.anchor:
                    sizes[done.anchor] = done.size
                add(done.size, event)
            elif isinstance(event, yaml.DocumentEndEvent):
                sizes.clear()  # anchors do not cross documents
    except yaml.YAMLError:
        return
