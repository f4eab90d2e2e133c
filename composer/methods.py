"""mergekit 0.1.5's merge-method arithmetic as pure float32 tensor functions, with its parameter names and defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    class _Torch:
        """torch, imported on first use: planning reads the specs below without paying torch's ~3 s import, so
        `--dry-run` answers at once; the functions import it when they first run."""

        def __getattr__(self, name: str):
            import torch as module

            globals()["torch"] = module  # later lookups go straight to the module
            return getattr(module, name)

    torch = _Torch()

# Notes that hold for every function below (checked against mergekit 0.1.5, merge_methods/ and sparsify.py):
# - Inputs are converted to float32 (a no-op for float32) and the result is float32. mergekit's linear and slerp
#   also work in float32; its task-arithmetic family, nuslerp and model_stock work in the inputs' own dtype, so
#   they agree with these functions bit for bit when mergekit loads in float32 (`dtype: float32`).
# - All inputs of one merge must have one shape, or ValueError. mergekit raises ValueError too ("Tensor size
#   mismatch"); it never pads or truncates inside a method. Vocabulary-sized tensors are aligned beforehand by
#   its tokenizer step, or truncated to the shortest row count by --unsafe-truncate-embeddings.
# - Input order matters to the last bit (sums run in model order), as in mergekit: pass models in recipe order.
# - Locality, for streaming in row blocks (blocks along dim 0): "elementwise" methods may be computed on any row
#   block independently (random ones need the generator consumed in row-major order: torch.bernoulli draws one
#   number per element, in order); "rows" methods need whole rows; "tensor" methods need whole-tensor statistics.
#   See locality().

SLERP_CHUNK = 1024 * 1024  # mergekit's slerp reduces norms and the dot product over chunks of this size
_KWARGS = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons", "lambda": "lambda_"}


def _float32(tensors: Sequence[Tensor]) -> list[Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("at least one tensor is required")
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError(f"tensor shapes differ: {shapes}")
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError("merging requires floating-point tensors")
    return [t.to(torch.float32) for t in tensors]


def _per_input(name: str, values: Sequence[float] | None, n: int, default: float | None) -> list[float]:
    if values is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return [float(default)] * n
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(values)}")
    return values


# --------------------------------------------------------------------------------------------------- linear


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """Weighted average, sum(w_i * x_i) / sum(w_i) (or the plain weighted sum when normalize=False).

    Paper: "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
    inference time", Wortsman et al. 2022, https://arxiv.org/abs/2203.05482.
    Locality: elementwise. There is no base: a base model in the recipe is just one more weighted input.
    mergekit accumulates with addcmul in float32 in input order, then divides by the float32 sum of the weights;
    it has no zero guard (a zero sum gives inf/nan). Here a zero sum with normalize=True raises ValueError.
    """
    xs = _float32(tensors)
    w = torch.tensor([_per_input("weight", weights, len(xs), None)], dtype=torch.float32)  # [1, n] as in mergekit
    coefficient_shape = (1,) * xs[0].ndim
    result = torch.zeros_like(xs[0])
    for x, coefficient in zip(xs, w.unbind(1)):
        result.addcmul_(x, coefficient.reshape(coefficient_shape))
    if normalize:
        denominator = w.sum(dim=1)
        if denominator.item() == 0:
            raise ValueError("linear: weights sum to zero, cannot normalize (set normalize: false)")
        result.div_(denominator.reshape(coefficient_shape))
    return result


# ---------------------------------------------------------------------------------------------------- slerp


def slerp(base: Tensor, other: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation from base (t=0) to other (t=1), treating each tensor as one flat vector.

    Paper: "Animating rotation with quaternion curves", Shoemake 1985 (SIGGRAPH), https://doi.org/10.1145/325165.325242
    (mergekit cites https://en.wikipedia.org/wiki/Slerp).
    Locality: tensor (norms of both tensors and the angle between them). result = c0 * base + c1 * other with
    c0 = sin((1-t)θ)/sin θ, c1 = sin(tθ)/sin θ, cos θ = <base/|base|, other/|other|> clamped to [-1, 1]; norms
    below eps=1e-8 are replaced by 1; when |cos θ| > 0.9995 (near-parallel or antiparallel) it falls back to
    (1-t)*base + t*other. As in mergekit, norms and the dot product are reduced over chunks of 2**20 elements of
    the flattened tensor (norm of the chunk norms; sum of the chunk dots), which fixes the float32 rounding.
    """
    v0, v1 = _float32([base, other])
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    coef_a, coef_b = slerp_coefficients(lambda s, e: (a[:, s:e].clone(), b[:, s:e].clone()), a.shape[1], t)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def slerp_coefficients(
    read: Callable[[int, int], tuple[Tensor, Tensor]], numel: int, t: float,
    each: Callable[[Callable[[int, int], Any], list[tuple[int, int]]], Iterable[Any]] | None = None,
) -> tuple[Tensor, Tensor]:
    """SLERP's whole-tensor statistics, streamed: (c0, c1), each of shape [1, 1], such that the result is
    c0 * base + c1 * other elementwise. `read(start, stop)` returns float32 [1, stop - start] slices of the
    flattened base and other (this function may overwrite them); they are read in mergekit's chunks of 2**20 elements,
    twice (norms, then the dot product of the normalised chunks), so the result is bit-identical to slerp() on
    whole tensors. `each(fn, chunks)` runs fn on every chunk and returns the results in order (default: one by
    one; the caller may run chunks on several threads, as long as `read` is safe to call from them)."""
    tt = torch.tensor([float(t)], dtype=torch.float32).reshape(-1, 1)
    if not numel:
        return 1 - tt, tt
    dot_threshold, eps = 0.9995, 1e-8
    each = each or (lambda fn, chunks: [fn(s, e) for s, e in chunks])
    starts = [(s, min(numel, s + SLERP_CHUNK)) for s in range(0, numel, SLERP_CHUNK)]

    def norms(s: int, e: int) -> tuple[Tensor, Tensor]:
        a, b = read(s, e)
        return torch.linalg.vector_norm(a, dim=1, keepdim=True), torch.linalg.vector_norm(b, dim=1, keepdim=True)

    chunk_norms = list(each(norms, starts))
    norm_a = torch.linalg.vector_norm(torch.stack([n for n, _ in chunk_norms]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([n for _, n in chunk_norms]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)

    def chunk_dot(s: int, e: int) -> Tensor:
        a, b = read(s, e)  # in place: the same arithmetic, without three temporaries of 4 MiB
        return a.div_(norm_a).mul_(b.div_(norm_b)).sum(dim=1, keepdim=True)

    dots = list(each(chunk_dot, starts))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    lerp = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lerp, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lerp, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lerp, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def nuslerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    base: Tensor | None = None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> Tensor:
    """mergekit's NuSLERP: slerp between exactly two models at t = w1 / (w0 + w1) (t = 0.5 when |w0 + w1| < 1e-6).

    Paper: spherical interpolation, Shoemake 1985 (as slerp); NuSLERP is mergekit's own variant (no paper).
    With a base, interpolates the task vectors: base + nuslerp(x0 - base, x1 - base).
    nuslerp_flatten=True (default): one flat vector per tensor. Otherwise vectors run along the last dim (each row
    separately), or along dim 0 (each column separately) when nuslerp_row_wise=True.
    Locality: tensor when flattened or row_wise; rows (vectors along the last dim) otherwise.
    Differences from slerp: unit vectors use x / max(|x|, 1e-7); the linear fallback triggers only when
    1 - cos^2 <= 1e-16, i.e. practically only for exactly (anti)parallel vectors in float32; t is a Python float.
    """
    if len(tensors) != 2:
        raise ValueError(f"nuslerp needs exactly two non-base tensors, got {len(tensors)}")
    xs = _float32(list(tensors) + ([base] if base is not None else []))
    t = nuslerp_t(_per_input("weight", weights, 2, None))
    dim = 0 if nuslerp_row_wise else -1
    if base is not None:
        b = xs[2]
        return b + _nuslerp(t, xs[0] - b, xs[1] - b, dim=dim, flatten=nuslerp_flatten)
    return _nuslerp(t, xs[0], xs[1], dim=dim, flatten=nuslerp_flatten)


def _nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> Tensor:
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


# --------------------------------------------------------------------------------------- sparsification


def _rescaled(tensor: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    """tensor * mask, scaled by |tensor|_1 / |tensor * mask|_1 when rescale (unless either norm is below eps)."""
    masked = tensor * mask
    if not rescale:
        return masked
    # float64 sums, rounded once: the streamed merges (composer.ranked) sum by blocks and must agree. mergekit sums
    # in the tensor's dtype, which can differ in the factor's last bit: far below the output dtype's rounding.
    before = tensor.abs().sum(dtype=torch.float64).to(torch.float32)
    after = masked.abs().sum(dtype=torch.float64).to(torch.float32)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def kept_range(n: int, density: float, gamma: float | None = None) -> tuple[int, int] | None:
    """The positions, in |value| order from the largest, that magnitude pruning keeps of n elements: None keeps
    everything.

    gamma None is TIES's top-k (k = max(1, int(density * n)); nothing for density <= 0); a gamma is Breadcrumbs:
    drop the int(gamma * n) largest, keep the int(density * n) next largest (the outlier cut shrinks when
    gamma + density > 1). Positions count in a stable sort: among equal |values| the earlier element comes first.
    mergekit's argsort orders equal values arbitrarily on large tensors (torch's CPU sort is not stable), so at an
    exact tie on a cut it may keep other elements than composer, which is deterministic. That needs exactly equal
    float32 task-vector entries at the cut; the cross-checks meet none on random checkpoints.
    """
    if density >= 1:
        return None
    if gamma is None:
        if density <= 0 or n == 0:
            return (0, 0)
        return (0, max(1, int(density * n)))
    target_n = int(density * n)
    n_bot = max(0, n - target_n - int(gamma * n))
    return (n - n_bot - target_n, n - n_bot)


def _keep_range(tensor: Tensor, kept: tuple[int, int] | None, rescale: bool) -> Tensor:
    if kept is None:
        return tensor
    if kept[0] >= kept[1]:
        return torch.zeros_like(tensor)
    order = torch.sort(tensor.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[order[kept[0]: kept[1]]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def _magnitude(tensor: Tensor, density: float, rescale: bool) -> Tensor:
    """Keep the k = max(1, int(density * numel)) largest |values| of the whole tensor."""
    return _keep_range(tensor, kept_range(tensor.numel(), density), rescale)


def _magnitude_outliers(tensor: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Drop the int(gamma * numel) largest |values|, then keep the int(density * numel) next largest."""
    return _keep_range(tensor, kept_range(tensor.numel(), density, gamma), rescale)


def _bernoulli(tensor: Tensor, density: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DARE: keep each element with probability density (density >= 1 keeps all and draws nothing)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return _rescaled(tensor, mask, rescale)


def _della_magprune(tensor: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DELLA MagPrune: keep probability rises linearly with |value|'s rank within its row (along dim 1),
    from density - epsilon (smallest) to density + epsilon (largest); 1-D tensors are one row."""
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    mask = della_mask(rows, density, epsilon, generator)
    if mask is None:
        return tensor
    return _rescaled(rows, mask, rescale).reshape(tensor.shape)


def della_mask(rows: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor | None:
    """MagPrune's keep mask for the rows (dim 0) of a 2-D tensor, drawn from `generator`: None keeps everything
    (density >= 1, nothing drawn); all zeros for density <= 0. Ranks are per row, so any block of whole rows can
    be drawn on its own (composer.merging streams DELLA this way)."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(rows)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return torch.bernoulli(probs, generator=generator)


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
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    eps = _per_input("epsilon", epsilons, n, 0.15)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _della_magprune(d, dens[i], eps[i], rescale, generator),
        consensus=True, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_,
    )


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
    n = len(tensors)
    dens = _per_input("density", densities, n, 1.0)
    eps = _per_input("epsilon", epsilons, n, 0.15)
    return _task_arithmetic(
        base, tensors, weights, lambda i, d: _della_magprune(d, dens[i], eps[i], rescale, generator),
        consensus=False, normalize=normalize, int8_mask=int8_mask, lambda_=lambda_,
    )


# ------------------------------------------------------------------------------------------- model stock


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock: t * mean(x_i) + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos = mean pairwise cosine of
    the task vectors x_i - base (each clamped to [-1, 1], norm product clamped to >= 1e-6).

    Paper: "Model Stock: All we need is just a few fine-tuned models", Jang et al. 2024,
    https://arxiv.org/abs/2403.19522.
    Needs at least two non-base tensors. When |1 + (N-1) cos| < 1e-6, t = 0 (keeps the base). filter_wise=True
    computes one cos per vector along the last dim (per row; a 1-D tensor is one row).
    Locality: tensor by default; rows when filter_wise (for 2-D and higher).
    """
    xs = _float32([base, *tensors])
    if len(xs) < 3:
        raise ValueError("model_stock needs a base and at least two other tensors")
    w_0, ws = xs[0], xs[1:]
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            norm_product = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos_thetas.append(((oa * ob).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


# ------------------------------------------------------------------------------------ streamed statistics
#
# model_stock (filter_wise off) and nuslerp (flattened) need whole-tensor angles. Streamed, they take them from
# float64 sums over blocks (squared norms and dot products), then blend block by block with the same elementwise
# arithmetic as above. mergekit reduces whole float32 tensors instead, so the angle may differ in its last float32
# bits: composer's is the more exact one, and the outputs agree within float32 rounding of the coefficient.


def angle_sums(vectors: Sequence[Tensor]) -> Tensor:
    """float64 [n + n(n-1)/2]: each vector's squared norm, then the dot product of every pair i < j (one block)."""
    v = torch.stack([x.reshape(-1) for x in vectors]).to(torch.float64)
    gram = v @ v.T
    i, j = torch.triu_indices(len(vectors), len(vectors), 1)
    return torch.cat([gram.diagonal(), gram[i, j]])


def _pair_cosines(sums: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    norms = sums[:n].sqrt()
    i, j = torch.triu_indices(n, n, 1)
    return norms, sums[n:], norms[i] * norms[j]


def model_stock_t(sums: Tensor, n: int) -> Tensor:
    """model_stock's interpolation factor t (float32, 0-dim) from angle_sums of its n task vectors."""
    _, dots, norm_products = _pair_cosines(sums, n)
    cos = (dots / norm_products.clamp(min=1e-6)).clamp(-1, 1).to(torch.float32).mean()
    denominator = 1 + (n - 1) * cos
    return torch.zeros(()) if denominator.abs() < 1e-6 else (n * cos) / denominator


def model_stock_blend(base: Tensor, tensors: Sequence[Tensor], t: Tensor) -> Tensor:
    """t * mean(x_i) + (1 - t) * base, elementwise, as model_stock computes it."""
    return t * (sum(tensors) / len(tensors)) + (1 - t) * base


def nuslerp_angle(sums: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """(sin((1 - t) theta), sin(t theta), sin theta) of nuslerp's flattened vectors v0, v1 (the inputs, or their
    task vectors with a base) from their angle_sums; None when they are colinear."""
    norms, dots, _ = _pair_cosines(sums, 2)
    cos = (dots[0] / (norms[0].clamp(min=1e-7) * norms[1].clamp(min=1e-7))).to(torch.float32).clamp(-1, 1)
    if (1 - cos.square()) <= 1e-16:
        return None
    theta = torch.acos(cos)
    return torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)


def nuslerp_blend(v0: Tensor, v1: Tensor, t: float, angle: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """nuslerp's elementwise step, rounded as _nuslerp rounds it."""
    if angle is None:
        return (1 - t) * v0 + t * v1
    s0, s1, sin_theta = angle
    return (s0 * v0 + s1 * v1) / sin_theta


def nuslerp_t(weights: Sequence[float]) -> float:
    """t = w1 / (w0 + w1), or 0.5 when |w0 + w1| < 1e-6."""
    w = [float(x) for x in weights]
    return 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)


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
