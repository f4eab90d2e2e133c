"""Recipe errors: where in the YAML text a problem sits, and the one-line message (file:line, place, fix, a
"did you mean") that composer prints for it."""
from __future__ import annotations

import difflib
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from composer.errors import RecipeError


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line in the YAML text of the value at `loc`, or of its nearest ancestor that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _schema_at(annotation: Any) -> type[BaseModel] | None:
    """The recipe model inside an annotation such as `list[OutputSlice] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _schema_at(arg)
        if found is not None:
            return found
    return None


def _model_fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping that holds `loc` (for 'did you mean')."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _schema_at(field.annotation) if field else None
    return list(model.model_fields) if model else []


def describe(root: type[BaseModel], err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """A pydantic error of the schema `root` as (place, message)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("list", "tuple"))))
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        return loc, f"unknown key '{key}'{suggest(key, _model_fields_at(root, loc))}"
    if kind == "missing":
        return loc, f"missing required key '{loc[-1]}'"
    msg = err["msg"].removeprefix("Value error, ")
    return loc, msg


def fail(path: str, node: yaml.Node | None, loc: tuple[Any, ...], message: str, extra: int = 0) -> RecipeError:
    line = _line_of(node, loc)
    where = f"{path}:{line}" if line else path
    place = f" {_loc_str(loc)}:" if loc else ""
    more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
    return RecipeError(f"{where}:{place} {message}{more}")


def yaml_error(exc: yaml.YAMLError, path: str) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else path
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return RecipeError(f"{where}: not valid YAML: {problem}")
