"""The generalized task-arithmetic family (deltas from a base, sparsified, optionally sign-elected, weighted and
summed): its core, the parameters its members share, and task_arithmetic, ties and the Breadcrumbs pair, whose
magnitude pruning streams through composer.ranked."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import float32 as _float32, per_input as _per_input
from composer.methods.method import ELEMENTWISE, MergeJob, MergeMethod, Param, Streaming, weights_sum
from composer.methods.sparsify import _magnitude, _magnitude_outliers, kept_range


# ------------------------------------------------------------------------------ generalized task arithmetic


def _task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    sparsify: Callable[[int, Tensor], Tensor] | None,
    *,
    consensus: bool,
    normalize: bool,
    int8_mask: bool,
    lambda_: float,
) -> Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group, step for step."""
    xs = _float32([base, *tensors])
    b, xs = xs[0], xs[1:]
    if not xs:
        return b
    w_list = _per_input("weight", weights, len(xs), None)
    deltas = b.new_empty((len(xs), *b.shape))
    for i, x in enumerate(xs):
        delta = torch.sub(x, b, out=deltas[i])
        if sparsify is not None:
            kept = sparsify(i, delta)  # the streamed ones work in place: no copy then
            if kept.data_ptr() != delta.data_ptr():
                delta.copy_(kept)
    w = torch.tensor(w_list, dtype=torch.float32)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = _sign_consensus(deltas, torch.int8 if int8_mask else torch.float32)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor += 1 - divisor.abs().sign()  # divisor[divisor == 0] = 1, in arithmetic (no bool tensors)
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return b + mixed


def _sign_consensus(weighted_deltas: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """TIES sign election ('sum'): majority sign = sign of the sum of weighted deltas, +1 on a tie at 0;
    keep entries whose sign equals it (zeros never match). A float32 mask of 0s and 1s, made with arithmetic: as
    mergekit's bool mask (`mask_dtype`, int8 or not, only changes its storage there), at ~1/5 of the cost of
    torch's comparisons and bool casts."""
    sign = weighted_deltas.sign()
    majority = weighted_deltas.sum(dim=0).sign_().add_(0.5).sign_()  # -1, 0, 1 -> -1, 1, 1
    return (sign * majority).clamp_(min=0)





def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """base + lambda * sum(w_i * (x_i - base)) [/ sum(w_i) when normalize and |sum(w_i)| >= 1e-8].

    Paper: "Editing Models with Task Arithmetic", Ilharco et al. 2022, https://arxiv.org/abs/2212.04089.
    Locality: elementwise. `density`, `rescale` and `int8_mask` are accepted (mergekit accepts them) and ignored.
    """
    return _task_arithmetic(
        base, tensors, weights, None, consensus=False, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_
    )


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """TIES: trim each task vector to its top-density |values|, elect signs, disjoint (weighted) mean.

    Paper: "TIES-Merging: Resolving Interference When Merging Models", Yadav et al. 2023,
    https://arxiv.org/abs/2306.01708.
    Locality: tensor (top-k magnitude over the whole tensor; elementwise only when every density >= 1 and
    rescale is off). Steps: d_i = trim(x_i - base) (k = max(1, int(density * numel)); L1-rescaled when rescale);
    d_i *= w_i; majority = sign(sum_i d_i) (+1 at 0); keep d_i whose sign equals it; merged = sum kept d_i, divided
    (normalize) by the sum of the kept w_i (1 where none is kept); times lambda. int8_mask only changes the mask's
    storage dtype in mergekit, never the result.
    """
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _magnitude(d, dens[i], rescale),
        consensus=True, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_,
    )


def breadcrumbs(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    gammas: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs: drop the gamma fraction of largest |delta| (outliers) and the smallest, keeping
    int(density * numel) elements per task vector; then task arithmetic.

    Paper: "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", Davari & Belilovsky 2023,
    https://arxiv.org/abs/2312.06795.
    Locality: tensor (magnitude sort over the whole tensor). gamma defaults to 0.01, density to 1.0 (no-op).
    """
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    gam = _per_input("gamma", gammas, n, 0.01)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _magnitude_outliers(d, dens[i], gam[i], rescale),
        consensus=False, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_,
    )


def breadcrumbs_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    gammas: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs sparsification + TIES sign election; see breadcrumbs and ties.

    Paper: https://arxiv.org/abs/2312.06795 (with TIES, https://arxiv.org/abs/2306.01708).
    Locality: tensor. normalize defaults to False here (unlike ties).
    """
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    gam = _per_input("gamma", gammas, n, 0.01)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _magnitude_outliers(d, dens[i], gam[i], rescale),
        consensus=True, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_,
    )



# ----------------------------------------------------------------------------------------------- the methods


def gta_method(name: str, title: str, url: str, summary: str, fn: Callable[..., Tensor], *, consensus: bool,
               normalize: bool, rescale: bool, extra: tuple[Param, ...] = (), negative_weights: bool = False,
               streaming: Callable[[MergeJob], Streaming | None] | None = None,
               check: Callable[[MergeJob], str | None] | None = None, random: bool = False) -> MergeMethod:
    """A member of the family as mergekit declares it: shared int8_mask, normalize, rescale, lambda; per-model
    weight and density, plus `extra`. Only task arithmetic gives a negative weight a meaning (negating a task)."""
    weight = Param("weight", per_input=True) if negative_weights else Param(
        "weight", per_input=True, low=0, why="a task vector's share: a negative one has no meaning for " + name)
    params = (
        Param("int8_mask", False, kind="bool"), Param("normalize", normalize, kind="bool"),
        Param("rescale", rescale, kind="bool"), Param("lambda", 1.0),
        weight, Param("density", 1.0, per_input=True, low=0, high=1, why="the fraction of the task vector kept"),
        *extra,
    )

    def formula(base: Tensor, xs: list[Tensor], s: dict, p: dict, generator) -> Tensor:
        kwargs: dict[str, Any] = dict(normalize=s["normalize"], rescale=s["rescale"], int8_mask=s["int8_mask"],
                                      lambda_=s["lambda"])
        kwargs.update({f"{k}s": p[k] for k in ("gamma", "epsilon") if k in p})
        if random:
            kwargs["generator"] = generator
        return fn(base, xs, p["weight"], p["density"], **kwargs)

    def checks(job: MergeJob) -> str | None:
        return weights_sum(job) or (check(job) if check else None)

    return MergeMethod(name=name, title=title, url=url, summary=summary, params=params, formula=formula,
                       streaming=streaming or (lambda job: ELEMENTWISE), check=checks, random=random,
                       consensus=consensus)


def merge_deltas(job: MergeJob, base: Tensor, xs: list[Tensor], sparsify: Callable[[int, Tensor], Tensor]) -> Tensor:
    """The family's arithmetic on a block whose sparsification was decided beforehand over the whole tensor."""
    s = job.shared
    return _task_arithmetic(base, xs, job.per_input["weight"], sparsify, consensus=job.method.consensus,
                            normalize=s["normalize"], int8_mask=s["int8_mask"], lambda_=s["lambda"])


def _ranked_prepare(job: MergeJob):
    """Which elements each task vector keeps: found in streamed histogram passes (composer.ranked)."""
    from composer import ranked

    gammas = job.per_input.get("gamma", [None] * len(job.inputs))
    ranges = [kept_range(job.numel, float(d), None if g is None else float(g))
              for d, g in zip(job.per_input["density"], gammas)]
    return ranked.select(job.deltas, job.numel, ranges, bool(job.shared["rescale"]),
                         raw=job.read_raw_all)


def _ranked_blend(job: MergeJob, keeps, a: int, b: int) -> Tensor:
    from composer import ranked

    base, xs = job.read_raw_all(a, b)  # the files' bfloat16, which the kernel converts as it loads
    # split where a kept part of a run of equal values starts or ends: each part's masks are a step or two, and
    # the blend is elementwise, so the parts' results are the whole block's
    bounds = [a, *sorted({i for k in keeps if k is not None for i in k.cuts(a, b)}), b]
    parts = []
    for pa, pb in zip(bounds, bounds[1:]):
        steps = [None if k is None else k.steps(pa, pb) for k in keeps]
        if not all(s is not None or k is None for s, k in zip(steps, keeps)):  # an end at inf or NaN
            break
        fused = _native_blend(job, base[pa - a: pb - a], [x[pa - a: pb - a] for x in xs], steps,
                              [None if k is None else k.factor for k in keeps])
        if fused is None:
            break
        parts.append(fused)
    else:
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return merge_deltas(job, base, xs, lambda i, d: ranked.apply(keeps[i], d, a))  # converts to float32 first


def _native_blend(job: MergeJob, base: Tensor, xs: list[Tensor], steps: list, factors: list,
                  out: Tensor | None = None) -> Tensor | None:
    """merge_deltas in one native pass (composer.native.ties_blend), its sparsification given as `steps` (ranked
    step masks, or DARE's and DELLA's drawn masks) and rescale `factors`, into `out` when given; None: not
    available. The divisor and the weights are made as _task_arithmetic makes them, so the bits are its bits."""
    from composer import native

    s = job.shared
    w = torch.tensor(_per_input("weight", job.per_input["weight"], len(xs), None), dtype=torch.float32)
    divisor = 1.0
    if not job.method.consensus:
        total = w.reshape(-1, 1).sum(dim=0)  # as _task_arithmetic sums its (n, 1) weights
        divisor = 1.0 if float(total.abs()) < 1e-8 else float(total)
    return native.ties_blend(base, xs, steps, [None if f is None else float(f) for f in factors], w,
                             consensus=job.method.consensus, normalize=bool(s["normalize"]), divisor=divisor,
                             lambda_=float(s["lambda"]), out=out)


_RANKED = Streaming("ranked", _ranked_blend, _ranked_prepare)


def _magnitude_streaming(job: MergeJob) -> Streaming:
    """Elementwise unless some density prunes: then the magnitude cut is found first."""
    return _RANKED if any(d < 1 for d in job.per_input["density"]) else ELEMENTWISE


_GAMMA = Param("gamma", 0.01, per_input=True, low=0, high=1, why="the fraction of the largest entries dropped")
_TA = ("Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089")
_TIES = ("TIES-Merging: Resolving Interference When Merging Models", "https://arxiv.org/abs/2306.01708")
_CRUMBS = ("Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", "https://arxiv.org/abs/2312.06795")

METHODS = (
    gta_method("task_arithmetic", *_TA, "base + lambda * sum(weight * (model - base))", task_arithmetic,
               consensus=False, normalize=False, rescale=False, negative_weights=True),
    gta_method("ties", *_TIES, "trim each task vector to its top density, elect signs, average what agrees", ties,
               consensus=True, normalize=True, rescale=False, streaming=_magnitude_streaming),
    gta_method("breadcrumbs", *_CRUMBS, "drop the largest gamma and the smallest entries, keep density",
               breadcrumbs, consensus=False, normalize=False, rescale=False, extra=(_GAMMA,),
               streaming=_magnitude_streaming),
    gta_method("breadcrumbs_ties", *_CRUMBS, "Breadcrumbs' sparsification with TIES' sign election",
               breadcrumbs_ties, consensus=True, normalize=False, rescale=False, extra=(_GAMMA,),
               streaming=_magnitude_streaming),
)
