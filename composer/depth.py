"""Depth sugar compiled to a layer sequence: slices, single models, LLaMA Pro block expansion, interleaves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from composer.errors import PlanError
from composer.recipe import Recipe
from composer.sources import SourceModel


@dataclass(frozen=True)
class LayerInput:
    """One source of an output layer (or of the embeddings and head): a model's layer and its parameter scopes."""

    model: str
    source_layer: int
    scopes: tuple[Mapping[str, Any] | None, ...] = ()  # highest precedence first: source, slice, global


@dataclass(frozen=True)
class LayerSource:
    """An output layer before tensors are planned: its inputs (one for passthrough), the relative depth `t` for
    gradient parameters, the scopes of parameters shared by all inputs, and the base model of its slice."""

    inputs: tuple[LayerInput, ...]
    t: float
    shared_scopes: tuple[Mapping[str, Any] | None, ...] = ()
    base: str | None = None
    expanded: bool = False

    @property
    def model(self) -> str:
        return self.inputs[0].model

    @property
    def source_layer(self) -> int:
        return self.inputs[0].source_layer


def _single(model: str, layer: int, t: float, scopes: tuple = (), expanded: bool = False) -> LayerSource:
    return LayerSource((LayerInput(model, layer, scopes),), t, scopes[1:], None, expanded)


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


def _t(k: int, count: int) -> float:
    """mergekit's relative depth of the k-th layer of a slice, for gradient parameters."""
    return k / (count - 1) if count > 1 else 1.0


def compile_layers(
    recipe: Recipe, sources: Mapping[str, SourceModel]
) -> tuple[list[LayerSource], LayerSource, LayerSource]:
    """The output layer sequence for any recipe form, and the sources of the embeddings (pre) and of the final
    norm and head (post): the first slice's and the last slice's models, as in mergekit, with t = 0."""
    g = recipe.parameters
    if recipe.block_expansion is not None:
        be = recipe.block_expansion
        n = sources[be.model].num_layers
        seq = expansion_layers(n, num_layers=be.num_layers, every=be.every)
        edge = _single(be.model, -1, 0.0)
        return [_single(be.model, i, 0.0, (), copy) for i, copy in seq], edge, edge
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
        layers = [_single(model, start + i, _t(i, il.window)) for model, start in zip(owners, starts)
                  for i in range(il.window)]
        return layers, _single(owners[0], -1, 0.0), _single(owners[-1], -1, 0.0)
    if recipe.models is not None:
        # mergekit's normal form: one slice over every model's full depth, the base model added if missing.
        entries = [(m.model, m.parameters) for m in recipe.models]
        if recipe.base_model and recipe.base_model not in [m for m, _ in entries]:
            entries.append((recipe.base_model, None))
        counts = {sources[m].num_layers for m, _ in entries}
        if len(counts) != 1:
            raise PlanError("models to merge need the same number of layers: " + ", ".join(
                f"'{m}' has {sources[m].num_layers}" for m, _ in entries))
        n = counts.pop()
        slices = [([(m, 0, params) for m, params in entries], None, recipe.base_model, n)]
    else:
        assert recipe.slices is not None
        slices = []
        for i, sl in enumerate(recipe.slices):
            for src in sl.sources:
                _check_range(sources[src.model], *src.layer_range, f"slices[{i}]")
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources}
            if len(lengths) != 1:
                raise PlanError(f"slices[{i}]: every source of a slice needs the same number of layers, "
                                f"got {sorted(lengths)}")
            slices.append(([(s.model, s.layer_range[0], s.parameters) for s in sl.sources], sl.parameters,
                           sl.base_model or recipe.base_model, lengths.pop()))

    def layer(entries, slice_params, base, first: int, t: float) -> LayerSource:
        """Layer `first` of a slice (or, with first = -1, the slice's edge tensors)."""
        return LayerSource(
            tuple(LayerInput(m, (start + first) if first >= 0 else -1, (params, slice_params, g))
                  for m, start, params in entries),
            t, (slice_params, g), base,
        )

    layers = [layer(entries, params, base, k, _t(k, count))
              for entries, params, base, count in slices for k in range(count)]
    return layers, layer(*slices[0][:3], -1, 0.0), layer(*slices[-1][:3], -1, 0.0)
