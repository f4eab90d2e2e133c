"""mergekit 0.1.5's merge-method arithmetic as pure float32 tensor functions, with its parameter names and defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from composer.methods.averaging import linear, model_stock, nuslerp, slerp
from composer.methods.taskvectors import (
    _CONSENSUS, _task_arithmetic, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear,
    task_arithmetic, ties,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

_KWARGS = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons", "lambda": "lambda_"}

# -------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class MethodSpec:
    """One merge method as mergekit 0.1.5 declares it.

    shared / per_input map mergekit's parameter names to their defaults; a required parameter (listed in
    `required`) maps to None. per_input values are given per non-base model, except for linear, whose `weight`
    is given for every input (per_input_includes_base). base is mergekit's base policy: "required", "optional"
    or "ignored" (a base model is then an ordinary input). Input counts include the base.
    """

    name: str
    paper: str
    shared: dict[str, Any]
    per_input: dict[str, Any]
    required: tuple[str, ...]
    needs_base: bool
    fn: Callable[..., Tensor]
    base: str = "required"
    per_input_includes_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    random: bool = False

    @property
    def parameters(self) -> frozenset[str]:
        return frozenset(self.shared) | frozenset(self.per_input)

    def apply(
        self,
        tensors: Sequence[Tensor],
        *,
        base: Tensor | None = None,
        shared: Mapping[str, Any] | None = None,
        per_input: Mapping[str, Sequence[Any]] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Call fn with mergekit-named parameters, defaults filled in. `tensors` excludes the base (linear has
        none); per_input values are lists aligned with `tensors`."""
        shared, per_input = dict(shared or {}), dict(per_input or {})
        for scope, given in (("shared", shared), ("per-input", per_input)):
            allowed = self.shared if scope == "shared" else self.per_input
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"{self.name} has no {scope} parameter(s) {unknown}")
        missing = [p for p in self.required if p not in shared and p not in per_input]
        if missing:
            raise ValueError(f"{self.name} requires {missing}")
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} requires a base tensor")
        if self.base == "ignored" and base is not None:
            raise ValueError(f"{self.name} has no base: pass every input in tensors")
        kwargs: dict[str, Any] = {_KWARGS.get(k, k): shared.get(k, v) for k, v in self.shared.items()}
        for k, v in self.per_input.items():
            kwargs[_KWARGS.get(k, k)] = list(per_input[k]) if k in per_input else [v] * len(tensors)
        if self.random:
            if generator is None:
                raise ValueError(f"{self.name} is random: pass a torch.Generator")
            kwargs["generator"] = generator
        if self.name == "linear":
            return self.fn(tensors, **kwargs)
        if self.name == "slerp":
            if len(tensors) != 1:
                raise ValueError(f"slerp merges a base and exactly one other tensor, got {len(tensors)} others")
            return self.fn(base, tensors[0], **kwargs)
        if self.name == "nuslerp":
            return self.fn(tensors, base=base, **kwargs)
        return self.fn(base, tensors, **kwargs)


def _gta_spec(name: str, paper: str, fn: Callable[..., Tensor], normalize: bool, rescale: bool, extra: dict, random: bool) -> MethodSpec:
    return MethodSpec(
        name=name,
        paper=paper,
        shared={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        per_input={"weight": None, "density": 1.0, **extra},
        required=("weight",),
        needs_base=True,
        fn=fn,
        random=random,
    )


_TA = "Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089"
_TIES = "TIES-Merging: Resolving Interference When Merging Models, https://arxiv.org/abs/2306.01708"
_DARE = "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, https://arxiv.org/abs/2311.03099"
_CRUMBS = "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, https://arxiv.org/abs/2312.06795"
_DELLA = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, https://arxiv.org/abs/2406.11617"
_SLERP = "Animating rotation with quaternion curves (Shoemake 1985), https://doi.org/10.1145/325165.325242"

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        name="linear",
        paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
        "inference time, https://arxiv.org/abs/2203.05482",
        shared={"normalize": True},
        per_input={"weight": None},
        required=("weight",),
        needs_base=False,
        fn=linear,
        base="ignored",
        per_input_includes_base=True,
    ),
    "slerp": MethodSpec(
        name="slerp", paper=_SLERP, shared={"t": None}, per_input={}, required=("t",), needs_base=True, fn=slerp,
        min_inputs=2, max_inputs=2,
    ),
    "nuslerp": MethodSpec(
        name="nuslerp",
        paper=_SLERP + " (NuSLERP is mergekit's variant)",
        shared={"nuslerp_row_wise": False, "nuslerp_flatten": True},
        per_input={"weight": None},
        required=("weight",),
        needs_base=False,
        fn=nuslerp,
        base="optional",
        min_non_base=2,
        max_non_base=2,
    ),
    "task_arithmetic": _gta_spec("task_arithmetic", _TA, task_arithmetic, False, False, {}, False),
    "ties": _gta_spec("ties", _TIES, ties, True, False, {}, False),
    "dare_ties": _gta_spec("dare_ties", _DARE, dare_ties, False, True, {}, True),
    "dare_linear": _gta_spec("dare_linear", _DARE, dare_linear, False, True, {}, True),
    "breadcrumbs": _gta_spec("breadcrumbs", _CRUMBS, breadcrumbs, False, False, {"gamma": 0.01}, False),
    "breadcrumbs_ties": _gta_spec("breadcrumbs_ties", _CRUMBS, breadcrumbs_ties, False, False, {"gamma": 0.01}, False),
    "della": _gta_spec("della", _DELLA, della, True, True, {"epsilon": 0.15}, True),
    "della_linear": _gta_spec("della_linear", _DELLA, della_linear, False, True, {"epsilon": 0.15}, True),
    "model_stock": MethodSpec(
        name="model_stock",
        paper="Model Stock: All we need is just a few fine-tuned models, https://arxiv.org/abs/2403.19522",
        shared={"filter_wise": False},
        per_input={},
        required=(),
        needs_base=True,
        fn=model_stock,
        min_inputs=3,
    ),
}


def streamed_task_arithmetic(
    name: str,
    base: Tensor,
    tensors: Sequence[Tensor],
    shared: Mapping[str, Any],
    per_input: Mapping[str, Sequence[Any]],
    sparsify: Callable[[int, Tensor], Tensor],
) -> Tensor:
    """One block of a task-arithmetic-family merge whose sparsification was decided beforehand over the whole
    tensors (composer.ranked): the rest of the method is elementwise. Parameters as in MethodSpec.apply."""
    spec = METHODS[name]
    s = {**spec.shared, **shared}
    weights = list(per_input["weight"]) if "weight" in per_input else [spec.per_input["weight"]] * len(tensors)
    return _task_arithmetic(base, tensors, weights, sparsify, consensus=name in _CONSENSUS,
                            normalize=s["normalize"], int8_mask=s["int8_mask"], lambda_=s["lambda"])


def locality(name: str, shared: Mapping[str, Any] | None = None, per_input: Mapping[str, Sequence[Any]] | None = None) -> str:
    """'elementwise', 'rows' (needs whole rows along dim 0 blocks; only for tensors of 2+ dims, else 'tensor')
    or 'tensor' (whole-tensor statistics) for a method with these mergekit-named parameters (defaults filled)."""
    spec = METHODS[name]
    s = {**spec.shared, **(shared or {})}
    density = (per_input or {}).get("density", 1.0)
    densities = [float(d) for d in (density if isinstance(density, (list, tuple)) else [density])]
    sparse = any(d < 1 for d in densities)
    if name in ("linear", "task_arithmetic"):
        return "elementwise"
    if name in ("slerp",):
        return "tensor"
    if name == "nuslerp":
        return "tensor" if s["nuslerp_flatten"] or s["nuslerp_row_wise"] else "rows"
    if name == "model_stock":
        return "rows" if s["filter_wise"] else "tensor"
    if not sparse:
        return "elementwise"
    if s["rescale"]:
        return "tensor"
    if name in ("dare_ties", "dare_linear"):
        return "elementwise"
    if name in ("della", "della_linear"):
        return "rows"
    return "tensor"  # ties, breadcrumbs, breadcrumbs_ties: magnitude ranking over the whole tensor


__all__ = [
    "METHODS", "MethodSpec", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
    "linear", "locality", "model_stock", "nuslerp", "slerp", "task_arithmetic", "ties",
]
