"""The merge methods: a registry of MergeMethod objects, one file per family. The recipe schema, the planner, the
engine, `--dry-run`, the card and the README table read it; adding a method is its file plus one line here."""
from __future__ import annotations

from composer.methods import averaging, dare, extra, taskvectors
from composer.methods import spherical
from composer.methods.averaging import linear, model_stock
from composer.methods.dare import dare_linear, dare_ties, della, della_linear
from composer.methods.method import MergeJob, MergeMethod, Param, Streaming
from composer.methods.spherical import nuslerp, slerp
from composer.methods.taskvectors import breadcrumbs, breadcrumbs_ties, task_arithmetic, ties

REGISTRY: tuple[MergeMethod, ...] = (
    *averaging.METHODS, *spherical.METHODS, *taskvectors.METHODS, *dare.METHODS, *extra.METHODS,
)
METHODS: dict[str, MergeMethod] = {m.name: m for m in REGISTRY}
MethodSpec = MergeMethod  # the name earlier versions exported


def table() -> str:
    """The README's method table, from the registry."""
    rows = ["| method | parameters (per model unless marked shared) | base | paper |", "|---|---|---|---|"]
    for m in REGISTRY:
        per = [p.describe() for p in m.params if p.per_input and not p.unused]
        shared = [p.describe() for p in m.params if not p.per_input]
        text = ", ".join(per + (["shared " + ", ".join(shared)] if shared else [])) or "none"
        rows.append(f"| `{m.name}` | {text} | {m.contract_text()} | [{m.title}]({m.url}) |")
    return "\n".join(rows) + "\n"


__all__ = [
    "METHODS", "REGISTRY", "MergeJob", "MergeMethod", "MethodSpec", "Param", "Streaming", "breadcrumbs",
    "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear", "linear", "model_stock", "nuslerp",
    "slerp", "table", "task_arithmetic", "ties",
]
