"""Depth sugar compiled to a layer sequence: slices, single models, LLaMA Pro block expansion, interleaves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from composer.errors import PlanError
from composer.recipe import Recipe
from composer.sources import SourceModel


@dataclass(frozen=True)
class LayerSource:
    """An output layer before tensors are planned: source, and where its parameters come from."""

    model: str
    source_layer: int
    t: float
    scopes: tuple[Mapping[str, Any] | None, ...] = ()
    expanded: bool = False


def _check_range(model: SourceModel, start: int, end: int, where: str) -> None:
    if end > model.num_layers:
        raise PlanError(
            f"{where}: layer_range [{start}, {end}] is out of range for '{model.name}', which has "
            f"{model.num_layers} layers: use an end of at most {model.num_layers}"
        )


def expansion_layers(n: int, *, num_layers: int | None = None, every: int | None = None) -> list[tuple[int, bool]]:
    """LLaMA Pro's placement (scripts/block_expansion.py): after layer i, where (i+1) % split == 0, a copy of i.

    Returns [(source layer, is_copy)] in output order.
    """
    if every is not None:
        split = every
        if split > n:
            raise PlanError(f"block_expansion every={every} is more than the model's {n} layers: use at most {n}")
    else:
        assert num_layers is not None
        added = num_layers - n
        if added < 1 or added > n:
            raise PlanError(
                f"block_expansion num_layers={num_layers} must be between {n + 1} and {2 * n} for a {n}-layer model"
            )
        split = n // added
        if n // split != added:
            valid = sorted({n + n // s for s in range(1, n + 1)})
            lower = max([v for v in valid if v < num_layers], default=None)
            upper = min([v for v in valid if v > num_layers], default=None)
            options = [f"{v} (a copy every {n // (v - n)})" for v in (lower, upper) if v is not None]
            raise PlanError(
                f"block_expansion num_layers={num_layers} cannot be placed evenly in {n} layers: use "
                + " or ".join(options)
            )
    out: list[tuple[int, bool]] = []
    for i in range(n):
        out.append((i, False))
        if (i + 1) % split == 0:
            out.append((i, True))
    return out


def compile_layers(recipe: Recipe, sources: Mapping[str, SourceModel]) -> tuple[list[LayerSource], list[str]]:
    """The output layer sequence for any recipe form, plus the models giving the pre and post tensors."""
    g = recipe.parameters
    if recipe.block_expansion is not None:
        be = recipe.block_expansion
        n = sources[be.model].num_layers
        seq = expansion_layers(n, num_layers=be.num_layers, every=be.every)
        return [LayerSource(be.model, i, 0.0, (), copy) for i, copy in seq], [be.model, be.model]
    if recipe.models is not None:
        entry = recipe.models[0]
        n = sources[entry.model].num_layers
        layers = [LayerSource(entry.model, i, i / (n - 1) if n > 1 else 1.0, (entry.parameters, g)) for i in range(n)]
        return layers, [entry.model, entry.model]
    if recipe.interleave is not None:
        il = recipe.interleave
        counts = {sources[m].num_layers for m in il.models}
        if len(counts) != 1:
            raise PlanError("interleave needs models with the same number of layers: " + ", ".join(
                f"'{m}' has {sources[m].num_layers}" for m in il.models))
        n, step = counts.pop(), il.window - il.overlap
        if il.window > n or (n - il.window) % step:
            raise PlanError(
                f"interleave window={il.window} overlap={il.overlap} does not tile {n} layers: "
                f"(layers - window) must be a multiple of window - overlap = {step}"
            )
        starts = range(0, n - il.window + 1, step)
        owners = [il.models[k % len(il.models)] for k in range(len(starts))]
        layers = [LayerSource(model, start + i, i / (il.window - 1) if il.window > 1 else 1.0)
                  for model, start in zip(owners, starts) for i in range(il.window)]
        return layers, [owners[0], owners[-1]]
    assert recipe.slices is not None
    layers = []
    for i, sl in enumerate(recipe.slices):
        src = sl.sources[0]
        start, end = src.layer_range
        _check_range(sources[src.model], start, end, f"slices[{i}]")
        count = end - start
        for k in range(count):
            t = k / (count - 1) if count > 1 else 1.0
            layers.append(LayerSource(src.model, start + k, t, (src.parameters, sl.parameters, g)))
    return layers, [recipe.slices[0].sources[0].model, recipe.slices[-1].sources[0].model]


def edge_scopes(recipe: Recipe, which: int) -> tuple[Mapping[str, Any] | None, ...]:
    """Parameter scopes for embeddings (which=0, first slice) and final norm/head (which=-1, last slice)."""
    if recipe.slices:
        sl = recipe.slices[which]
        return (sl.sources[0].parameters, sl.parameters, recipe.parameters)
    if recipe.models:
        return (recipe.models[0].parameters, recipe.parameters)
    return ()
