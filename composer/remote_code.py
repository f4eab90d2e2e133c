"""Custom modelling code: a base config whose `auto_map` names Python modules needs them beside the output's
config.json to load (with trust_remote_code=True, as its source did). composer copies those files as bytes and
never imports or runs them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from composer.filecheck import check_inside, is_regular
from composer.tensorplan import Plan


@dataclass(frozen=True)
class RemoteCode:
    model: str  # the source whose code it is: the base model, whose config the output keeps
    files: tuple[Path, ...]  # copied to the output: the modules auto_map names and the folder's other top-level .py
    missing: tuple[str, ...]  # modules auto_map names that the source folder lacks
    elsewhere: tuple[str, ...]  # auto_map entries whose code lives in another Hub repo ("org/repo--module.Class")


def _references(auto_map: Mapping[str, Any]) -> list[str]:
    refs: list[str] = []
    for value in auto_map.values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str) and ref:
                refs.append(ref)
    return refs


def remote_code(plan: Plan) -> RemoteCode | None:
    """The custom code the output needs, or None when its config has no auto_map."""
    auto_map = plan.config.get("auto_map")
    if not isinstance(auto_map, Mapping) or not auto_map:
        return None
    base = plan.sources[plan.base]
    modules, elsewhere = [], []
    for ref in _references(auto_map):
        if "--" in ref:
            elsewhere.append(ref)
        elif "." in ref:
            modules.append(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    modules = list(dict.fromkeys(modules))
    if base.path is None:  # shapes only (a dry run's unbuilt stage, a Hub model read by headers)
        return RemoteCode(base.name, (), tuple(modules), tuple(elsewhere))
    files = [base.path / m for m in modules if is_regular(base.path / m)]
    files += [p for p in sorted(base.path.glob("*.py")) if p not in files and is_regular(p)]
    for f in files:
        check_inside(base.path, f)  # a link out of the folder would copy an unrelated file into the output
    missing = tuple(m for m in modules if base.path / m not in files)
    return RemoteCode(base.name, tuple(files), missing, tuple(dict.fromkeys(elsewhere)))


def describe(code: RemoteCode) -> str:
    """One line for --dry-run: what the output needs and what is copied."""
    copied = ", ".join(f.name for f in code.files) or "nothing"
    text = (f"needs trust_remote_code=True (config.json's auto_map names custom code): copies {copied} from "
            f"'{code.model}' unchanged; composer never imports or runs them")
    if code.missing:
        text += f"; missing from '{code.model}': {', '.join(code.missing)} (the output will not load without them)"
    if code.elsewhere:
        text += f"; code in other repos: {', '.join(code.elsewhere)}"
    return text
