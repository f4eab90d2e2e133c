"""The registry entries of the geometric (karcher, multislerp, nearswap) and fusion (sce, arcee_fusion, ram,
ramplus_tl) methods: their parameters, contracts and streaming, beside the formulas in geometric.py and fusion.py."""
from __future__ import annotations

from composer.methods.fusion import (ARCEE_STREAMING, RAM_STREAMING, RAMPLUS_STREAMING, arcee_fusion, ram, ramplus_tl,
                                     sce, sce_streaming)
from composer.methods.geometric import KARCHER_STREAMING, MULTISLERP_STREAMING, karcher, multislerp, nearswap
from composer.methods.method import ELEMENTWISE, MergeMethod, Param


def _one_other(name: str, xs: list) -> None:
    if len(xs) != 1:
        raise ValueError(f"{name} merges a base and exactly one other tensor, got {len(xs)} others")


METHODS = (
    MergeMethod(
        name="multislerp", title="Multi-SLERP (barycentric interpolation on a hypersphere)",
        url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        summary="spherical interpolation of any number of models by weight, optionally of task vectors from a base",
        params=(Param("weight", per_input=True, low=0, why="a barycentric weight"),
                Param("normalize_weights", True, kind="bool"), Param("eps", 1e-8, low=0, open_low=True)),
        formula=lambda base, xs, s, p, g: multislerp(base, xs, p["weight"], normalize_weights=s["normalize_weights"],
                                                     eps=s["eps"]),
        base="optional", min_others=1, streaming=lambda job: MULTISLERP_STREAMING,
    ),
    MergeMethod(
        name="karcher", title="Karcher mean on the unit hypersphere", url="https://arxiv.org/abs/2603.04972",
        summary="the Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
        params=(Param("max_iter", 10, kind="integer", low=0), Param("tol", 1e-5, low=0, open_low=True)),
        formula=lambda base, xs, s, p, g: karcher(None, xs, max_iter=int(s["max_iter"]), tol=s["tol"]),
        base="ignored", streaming=lambda job: KARCHER_STREAMING,
    ),
    MergeMethod(
        name="nearswap", title="NearSwap (QuartetAnemoi's model card)",
        url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary="take the other model's value where it lies within t of the base's, else move t towards it",
        params=(Param("t", low=0, high=1, why="a distance in weight units (typically 1e-4)"),),
        formula=lambda base, xs, s, p, g: (_one_other("nearswap", xs), nearswap(base, xs, t=s["t"]))[1],
        min_inputs=2, max_inputs=2, min_others=1, max_others=1, streaming=lambda job: ELEMENTWISE,
    ),
    MergeMethod(
        name="sce", title="FuseChat: Knowledge Fusion of Chat Models (SCE)", url="https://arxiv.org/abs/2408.07990",
        summary="select the elements whose task vectors vary most, weight models by their mean squares, erase "
        "minority signs",
        params=(Param("select_topk", 1.0, low=0, high=1, open_low=True, why="the fraction of elements selected"),
                Param("int8_mask", False, kind="bool"),
                Param("weight", 1.0, per_input=True, unused=True)),
        formula=lambda base, xs, s, p, g: sce(base, xs, select_topk=s["select_topk"], int8_mask=s["int8_mask"]),
        notes="`weight` is accepted and ignored, as mergekit 0.1.5 ignores it: SCE weights each task vector by its "
        "mean square",
        streaming=sce_streaming,
    ),
    MergeMethod(
        name="arcee_fusion", title="Arcee Fusion", url="https://arcee.ai",
        summary="keep the other model's changes whose KL-weighted importance exceeds median + 1.5 IQR",
        params=(), formula=lambda base, xs, s, p, g: (_one_other("arcee_fusion", xs),
                                                     arcee_fusion(base, xs, generator=g))[1],
        min_inputs=2, max_inputs=2, min_others=1, max_others=1, random=True, streaming=lambda job: ARCEE_STREAMING,
    ),
    MergeMethod(
        name="ram", title="Reinforced Agent Merging", url="https://arxiv.org/abs/2601.13572",
        summary="keep each task vector's unique changes, average the ones several models share",
        params=(Param("epsilon", 1e-5, low=0),),
        formula=lambda base, xs, s, p, g: ram(base, xs, epsilon=s["epsilon"]), streaming=lambda job: RAM_STREAMING,
    ),
    MergeMethod(
        name="ramplus_tl", title="Reinforced Agent Merging Plus (tensor-local)", url="https://arxiv.org/abs/2601.13572",
        summary="ram with each model's unique changes scaled up by its share of shared ones",
        params=(Param("epsilon", 1e-5, low=0), Param("r", 0.1, low=0), Param("alpha", 0.2, low=0)),
        formula=lambda base, xs, s, p, g: ramplus_tl(base, xs, epsilon=s["epsilon"], r=s["r"], alpha=s["alpha"]),
        streaming=lambda job: RAMPLUS_STREAMING,
    ),
)
