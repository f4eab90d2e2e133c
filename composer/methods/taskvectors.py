"""The generalized task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della* (deltas from a
base, sparsified, optionally sign-elected, weighted and summed)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import float32 as _float32, per_input as _per_input
from composer.methods.sparsify import _bernoulli, _della_magprune, _magnitude, _magnitude_outliers


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
        delta = x - b
        deltas[i] = sparsify(i, delta) if sparsify is not None else delta
    w = torch.tensor(w_list, dtype=torch.float32)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = _sign_consensus(deltas, torch.int8 if int8_mask else torch.float32)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
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
    keep entries whose sign equals it (zeros never match)."""
    sign = weighted_deltas.sign().to(mask_dtype)
    majority = (weighted_deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


_CONSENSUS = frozenset({"ties", "dare_ties", "breadcrumbs_ties", "della"})  # the TIES sign election


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


def dare_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    generator: torch.Generator,
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """DARE + task arithmetic: drop each delta element with probability 1 - density, then as task_arithmetic.

    Paper: "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"
    (DARE), Yu et al. 2023, https://arxiv.org/abs/2311.03099.
    rescale (mergekit's default True) is NOT the paper's 1/density: mergekit multiplies the kept values by
    |delta|_1 / |kept|_1 (per tensor and model; skipped when either is below 1e-7), so the L1 norm is preserved
    exactly and the mean in expectation. Masks are drawn with torch.bernoulli from `generator`, model by model
    in input order; a model with density >= 1 draws nothing.
    Locality: elementwise when rescale=False (the stream is consumed one number per element, row-major);
    tensor when rescale=True (two L1 norms per model).
    """
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _bernoulli(d, dens[i], rescale, generator),
        consensus=False, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_,
    )


def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    generator: torch.Generator,
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """DARE random drop + TIES sign election (no magnitude trim); see dare_linear and ties.

    Paper: DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099 (with TIES, https://arxiv.org/abs/2306.01708).
    Locality: elementwise when rescale=False, tensor when rescale=True. normalize defaults to False here.
    """
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _bernoulli(d, dens[i], rescale, generator),
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


def della(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    epsilons: Sequence[float] | None = None,
    generator: torch.Generator,
    normalize: bool = True,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """DELLA: MagPrune (magnitude-ranked random drop) + TIES sign election + disjoint mean.

    Paper: "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    Deep et al. 2024, https://arxiv.org/abs/2406.11617.
    Keep probability = density - epsilon + 2 * epsilon * (rank - 1) / (n - 1), ranks of |delta| within each row
    (dim 1; 1-D tensors are one row); ValueError unless 0 < density - epsilon and density + epsilon < 1 (checked
    only when 0 < density < 1). rescale is the L1-norm ratio over the whole tensor (not the paper's 1/p).
    Locality: rows when rescale=False (one random number per element, row-major), tensor when rescale=True.
    """
    return _della(base, tensors, weights, densities, epsilons, generator, rescale, consensus=True,
                  normalize=normalize, int8_mask=int8_mask, lambda_=lambda_)


def della_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    epsilons: Sequence[float] | None = None,
    generator: torch.Generator,
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """DELLA MagPrune + task arithmetic (no sign election); see della.

    Paper: https://arxiv.org/abs/2406.11617.
    Locality: rows when rescale=False, tensor when rescale=True.
    """
    return _della(base, tensors, weights, densities, epsilons, generator, rescale, consensus=False,
                  normalize=normalize, int8_mask=int8_mask, lambda_=lambda_)


def _della(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float] | None,
           epsilons: Sequence[float] | None, generator: torch.Generator, rescale: bool, **options) -> Tensor:
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    eps = _per_input("epsilon", epsilons, n, 0.15)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _della_magprune(d, dens[i], eps[i], rescale, generator), **options,
    )
