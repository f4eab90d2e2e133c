"""mergekit's parameter semantics: scalars, gradients across a slice's layers, `{filter, value}` lists, scopes."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from composer.recipe import FilteredValue


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """One setting for one tensor at relative depth t in [0, 1]; None when no filter matches.

    Numeric lists are gradients, interpolated linearly at t; other lists pick the entry at int(t * (n - 1));
    `{filter, value}` lists take the first entry whose filter is absent, '*', or a substring of the tensor name.
    """
    if isinstance(setting, FilteredValue):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate(cond.value, tensor_name, t)
        return None
    raise TypeError(f"unexpected parameter value {setting!r}")


def resolve_parameter(
    name: str, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float, default: Any = None
) -> Any:
    """The first scope (highest precedence first: source, slice, global) whose setting resolves wins."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return default
