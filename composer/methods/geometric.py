"""Geometric merges: Karcher mean, Multi-SLERP and NearSwap, as mergekit 0.1.5 computes them, in float32."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import float32 as _float32, per_input as _per_input
from composer.methods.method import MergeJob, Streaming, scratch

# Each function repeats mergekit 0.1.5's operations in mergekit's order (merge_methods/karcher.py, multislerp.py,
# nearswap.py), so with a float32 recipe (`dtype: float32`, where mergekit computes in float32 too) the results are
# the same bits, in one process with one torch thread count (torch's whole-tensor float32 reductions, which both
# use, depend on it for large tensors). mergekit computes in the inputs' own dtype; these functions always in
# float32.
#
# Streaming over blocks of a tensor (composer.methods.method.Streaming; the streamed functions sit at the end of this
# file, the registry entries in extra.py):
# - nearswap is elementwise: any block may be computed on its own, and the result is the same bits.
# - karcher and multislerp ("statistics"): each result is a fixed linear combination of the inputs, sum_i c_i x_i
#   (multislerp with a base: base + sum_i c_i (x_i - base)), and every number that decides the c_i is a dot product
#   of two of them. multislerp's result is m^ cos(|g| + eps) sum w_i |v_i| (+ base), m = sum w_i v_i / (|v_i| + eps),
#   and its tangent sum g is zero (sum w_i (u_i - <u_i, m^> m^) = m - |m| m^ = 0; mergekit's float32 g is rounding
#   noise). karcher's mean starts as a combination of the kept units u_i and each move keeps it one
#   (m' = cos|g| m + sin|g| g / |g|, g = sum c_i (u_i - <m, u_i> m), renormalised), so m = sum_i beta_i u_i
#   throughout, and <m, u_i>, |g| and |m| are quadratic forms in the Gram matrix G_ij = <x_i, x_j>. So: one
#   statistics pass for G (gram_sums: float32 products, exact in float64, summed in float64), the whole iteration on
#   n coefficients (karcher_coefficients, multislerp_coefficients: mergekit's steps and branches, its float32
#   decisions taken on float32 roundings), and one elementwise pass (combination_blend). Two passes over the inputs
#   whatever max_iter, and a few float32 blocks held (ranked.BLOCK elements per input in the pass, CHUNK_ELEMENTS in
#   the blend). multislerp takes one more pass only where its weighted units cancel (|m| < 1e-3 sum w_i, so that
#   |m| from G would be rounding-sized): there it measures the float32 m as mergekit forms it, exactly zero for
#   inputs that cancel exactly, and falls back or raises as mergekit does.
#   The alternative for karcher, iterating on a whole-tensor float32 mean and reading the inputs block by block
#   each iteration, holds the mean whole and reads the inputs 2 + 3 max_iter times (32 passes and 262 MB for a
#   32000x2048 embedding at max_iter 10), for the same float64-exact statistics at best.
# - A tensor of at most one statistics step (job.block elements, 4 MB in float32 per input) is computed by the formula
#   itself: that holds no more than a block per input, and it is mergekit's float32 arithmetic, so such tensors keep
#   mergekit's bits (norms, biases, small models). Larger ones are the more exact: torch's float32 whole-tensor
#   reductions err by ~1e-5 at 2**20 elements and more beyond (their last bits also depend on torch's thread count),
#   e.g. vector_norm (one thread) of a bf16 32000x2048 embedding is 160.98 where the exact norm is 161.92, so the
#   formula's (mergekit's float32 arithmetic) multislerp of three such tensors is 1.1% short in norm, where the
#   streamed result is the exact one rounded to bf16 in all but 0.002% of the elements (those lie within a float32
#   rounding of a bf16 rounding boundary, and round to its other side). tests/test_methods_geometric.py bounds the
#   streamed result against exact and against the formula.

# ------------------------------------------------------------------------------------------------- karcher


def karcher(base: Tensor | None, tensors: Sequence[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Karcher (Riemannian) mean of the inputs' directions on the unit sphere, scaled by their mean norm.

    Paper: as mergekit cites it, https://arxiv.org/abs/2603.04972.
    Each flattened input x_i (i = 1..n, weights a_i = 1/n) gives a norm r_i = |x_i| and a unit u_i = x_i / r_i
    (zero when r_i = 0). Over the inputs with r_i > tol (weights renormalised to sum 1 over them):
    m = normalise(sum a_i u_i), or the first such u_i when |sum a_i u_i| < tol; then up to max_iter times:
    g = sum over i with theta_i >= tol of a_i (theta_i / sin theta_i) (u_i - cos theta_i m), cos theta_i =
    clamp(<m, u_i>, -1, 1); stop when |g| < tol, else m = cos|g| m + sin|g| g/|g|, renormalised when its norm
    exceeds tol. The result is (sum over all i of r_i / n) * m. When no input has r_i > tol the result is zeros
    (mergekit's sum(x * 0)). One input is returned as it is (in float32).
    Parameters (mergekit's names, shared): max_iter (int, 10), tol (float, 1e-5). mergekit's karcher takes no
    weights: every input weighs 1/n.
    Base: mergekit ignores the base (a base model is an ordinary input, in model order): pass base=None and every
    input in `tensors`; a base here raises ValueError rather than guessing its place in the order.
    Differences from mergekit: none in float32 (the same operations, in the same order, the same .item()
    branches); mergekit raises IndexError on zero inputs where this raises ValueError.
    """
    if base is not None:
        raise ValueError("karcher has no base: pass base=None and every input, the base model included, in tensors")
    if not tensors:
        raise ValueError("karcher needs at least one tensor")
    xs = _float32(tensors)
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs)

    norms, units = [], []
    for x in xs:
        norm = torch.linalg.vector_norm(x)
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else x / norm)

    kept = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not kept:
        return sum(x * 0 for x in xs)
    alpha_sum = sum(alphas[i] for i in kept)
    weights = [alphas[i] / alpha_sum for i in kept]
    kept_units = [units[i] for i in kept]

    mean = torch.zeros_like(kept_units[0])
    for weight, unit in zip(weights, kept_units):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = kept_units[0].clone() if mean_norm.item() < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, kept_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


# ---------------------------------------------------------------------------------------------- multislerp


def multislerp(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Multi-SLERP: barycentric interpolation of several models on the hypersphere, about an optional base.

    Reference: https://goddard.blog/posts/multislerp-wow-what-a-cool-idea.
    With v_i = x_i - base (or x_i without a base), flattened, and w the float32 weights (divided by their float32
    sum when normalize_weights): u_i = v_i / (|v_i| + eps), m = sum w_i u_i; m^ = m / |m|;
    t_i = u_i - <u_i, m^> m^; g = sum w_i t_i, c = |g| + eps;
    result = (m^ cos c + g sin(c) / c) * sum w_i |v_i| (+ base).
    (g is zero but for rounding, since the tangent space is taken at the weighted mean itself, so the result is
    m^ * sum w_i |v_i| up to the rounding of its float32 sums.)
    When |m| < eps: two inputs fall back to w_0 v_0 + w_1 v_1 (+ base); more raise ValueError (inputs that cancel,
    e.g. a and -a with equal weights). One non-base input is returned as it is (in float32), base and weight unused.
    Parameters (mergekit's names): weight (per non-base input, required), normalize_weights (shared bool, True),
    eps (shared float, 1e-8). Base: optional; at least one non-base input.
    Differences from mergekit: none in float32, except that a zero weight sum with normalize_weights raises
    ValueError here, where mergekit divides by it and returns inf/nan.
    """
    if not tensors:
        raise ValueError("multislerp needs at least one non-base tensor")
    xs = _float32(list(tensors) + ([base] if base is not None else []))
    w_values = _per_input("weight", weights, len(tensors), None)
    if len(tensors) == 1:
        return xs[0]
    others, b = (xs[:-1], xs[-1]) if base is not None else (xs, None)

    stacked = torch.stack(others, dim=0)
    if b is not None:
        stacked -= b
    flat = stacked.view(stacked.shape[0], -1)

    w = torch.tensor(w_values, dtype=torch.float32)
    if normalize_weights:
        total = w.sum()
        if total.item() == 0:
            raise ValueError("multislerp: weights sum to zero, cannot normalize (set normalize_weights: false)")
        w = w / total

    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            merged = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            return merged if b is None else merged + b
        raise ValueError(
            "multislerp: the weighted sum of the inputs' unit vectors is zero (antipodal inputs, or sets of inputs, "
            "whose weights balance exactly, e.g. a and -a with equal weights): change the weights"
        )
    mean = mean / mean_norm

    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * w).sum()
    result = result.view(stacked.shape[1:])
    return result if b is None else result + b


# ------------------------------------------------------------------------------------------------ nearswap


def nearswap(base: Tensor, tensors: Sequence[Tensor], *, t: float) -> Tensor:
    """NearSwap: take the other model's value where it is near the base's, and move toward it less the further off.

    Reference: https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (the method's author's model card).
    Elementwise, with a = base and b the one other input: w = clamp(t / max(|a - b|, 1e-6), 0, 1);
    result = w * b + (1 - w) * a. Where |a - b| <= t the result is b, else a + (t / |a - b|) (b - a), which moves
    b's value at most t from a. t = 0 (or below) gives the base, t >= max |a - b| gives b.
    Parameter (mergekit's name): t (shared float, required, no default), a distance in weight units: t >= 0, in
    practice small (the reference uses 1e-4). Base: required; exactly one other input.
    t / x is computed as torch computes a Python float over a tensor, reciprocal(x) * t, as in mergekit.
    Differences from mergekit: none in float32.
    """
    if base is None:
        raise ValueError("nearswap needs a base tensor")
    if len(tensors) != 1:
        raise ValueError(f"nearswap merges a base and exactly one other tensor, got {len(tensors)} others")
    a, b = _float32([base, tensors[0]])
    absdiff = torch.abs(a - b)
    weight = (float(t) / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


# --------------------------------------------------------------------------------------- streamed: statistics
#
# karcher and multislerp over blocks (see the notes at the top): a Gram pass, n coefficients, an elementwise pass.

GRAM_STEP = 2**15  # elements per float64 copy in gram_sums: n x 256 KB, reused from the heap, no page faults
GRAM_RUN = 1024  # within a copy, each run's products are summed by one thread (bmm), whatever torch's thread count


def gram_sums(rows: Tensor) -> Tensor:
    """float64 [n, n]: the dot products <v_i, v_j> of the rows of a float32 [n, m] block. Each product of two
    float32 values is exact in float64; runs of GRAM_RUN are summed in float64 by one batched product, the runs in
    order, so the result depends neither on torch's thread count nor on where the caller cut its blocks beyond
    float64 rounding (relative 1e-16 per sum, where a float32 sum of 2**20 terms errs by ~1e-5)."""
    n, m = rows.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for s in range(0, m, GRAM_STEP):
        part = rows[:, s: s + GRAM_STEP].to(torch.float64)
        width = part.shape[1]
        whole = width - width % GRAM_RUN
        if whole:
            runs = part[:, :whole].reshape(n, -1, GRAM_RUN).transpose(0, 1)  # [runs, n, GRAM_RUN]
            gram += torch.bmm(runs, runs.transpose(1, 2)).sum(0)
        if whole < width:
            tail = part[:, whole:]
            gram += tail @ tail.T
    return gram


def karcher_coefficients(gram: Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """karcher's result as sum_i c_i x_i: c (float64 [n]) from the inputs' Gram matrix G_ij = <x_i, x_j>.

    The mean is kept as m = sum_k beta_k u_k over the kept units u_k = x_k / r_k (r_k = sqrt(G_kk) > tol), with
    U_kl = <u_k, u_l> = G_kl / (r_k r_l): <m, u_i> = (U beta)_i and |sum_k gamma_k u_k|^2 = gamma^T U gamma. Each
    of karcher's steps is then a step on beta: the start (normalise(sum a_k u_k), or the first kept unit when that
    is below tol), then up to max_iter times gamma = sum_i c_i (e_i - d_i beta) with d_i = clamp((U beta)_i, -1, 1),
    c_i = a_i theta_i / sin theta_i (0 where theta_i < tol), stop when |gamma| < tol, else
    beta = cos|gamma| beta + sin|gamma| gamma / |gamma|, renormalised when its norm exceeds tol.
    c_k = scale beta_k / r_k, scale = sum over all i of r_i / n. Everything is float64, except that inputs are kept,
    and inputs skipped, as karcher's float32 norms and angles decide it: float32(r) > tol, and theta_i from
    float32(d_i) (in float32 an angle is 0 or >= 3.4e-4, so theta < tol means d rounds to 1)."""
    n = gram.shape[0]
    coefficients = torch.zeros(n, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    kept = [i for i in range(n) if norms[i].to(torch.float32).item() > tol]
    if not kept:
        return coefficients  # karcher's sum(x * 0)
    alpha = 1.0 / n
    weights = torch.full((len(kept),), alpha / (alpha * len(kept)), dtype=torch.float64)
    r = norms[kept]
    units = gram[kept][:, kept] / (r[:, None] * r[None, :])

    def size(beta: Tensor) -> Tensor:
        return (beta @ units @ beta).clamp(min=0).sqrt()

    beta = weights.clone()
    mean_norm = size(beta)
    beta = torch.eye(len(kept), dtype=torch.float64)[0] if mean_norm.item() < tol else beta / mean_norm
    for _ in range(max_iter):
        dots = (units @ beta).clamp(-1.0, 1.0)
        theta = torch.acos(dots)
        moving = torch.acos(dots.to(torch.float32)).to(torch.float64) >= tol
        factors = torch.where(moving, weights * theta / torch.sin(theta), 0.0)
        tangent = factors - (factors * dots).sum() * beta
        tangent_norm = size(tangent)
        if tangent_norm.item() < tol:
            break
        beta = torch.cos(tangent_norm) * beta + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = size(beta)
        if unit_norm.item() > tol:
            beta = beta / unit_norm
    coefficients[kept] = alpha * norms.sum() * beta / r
    return coefficients


def multislerp_weights(weights: Sequence[float], normalize_weights: bool = True) -> Tensor:
    """multislerp's float32 weights, divided by their float32 sum when normalize_weights (ValueError if it is 0)."""
    w = torch.tensor([float(v) for v in weights], dtype=torch.float32)
    if normalize_weights:
        total = w.sum()
        if total.item() == 0:
            raise ValueError("multislerp: weights sum to zero, cannot normalize (set normalize_weights: false)")
        w = w / total
    return w


def multislerp_coefficients(gram: Tensor, w: Tensor, eps: float = 1e-8, mean_norm: Tensor | None = None
                            ) -> tuple[Tensor, Tensor]:
    """multislerp's result as sum_i c_i v_i (+ base), for two or more vectors v_i (the inputs, or their task vectors
    from the base), from their Gram matrix G_ij = <v_i, v_j> (float64 [n, n]) and the weights w (multislerp_weights):
    (c, float64 [n]; |m| / sum |k_i| r_i, float64 []).

    With r_i = sqrt(G_ii) and k_i = w_i / (r_i + eps): m = sum k_i v_i, |m|^2 = k^T G k (or `mean_norm`, when the
    caller measured |m|), c_i = k_i / |m| * cos(eps) * sum w_i r_i: multislerp's m^ cos(|g| + eps) sum w_i |v_i|
    with its tangent sum g = 0. The second value says how far the weighted units cancel: |m|^2 from G is exact to
    ~1e-13 of (sum |k_i| r_i)^2, so below CANCELLED the caller measures |m| itself (multislerp_prepare)."""
    w64 = w.to(torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    k = w64 / (norms + eps)
    spread = (k.abs() * norms).sum().clamp(min=1e-300)
    size = (k @ gram @ k).clamp(min=0).sqrt() if mean_norm is None else mean_norm
    return k / size * math.cos(eps) * (w64 * norms).sum(), size / spread


@dataclass(frozen=True)
class Combination:
    """A streamed karcher or multislerp result: sum_i c_i x_i over `terms` ((input index, float32 0-dim c_i), in
    input order), or base + sum_i c_i (x_i - base) when `base`; for a tensor of one block, the formula's result
    itself (`whole`, flat)."""

    terms: tuple[tuple[int, Tensor], ...] = ()
    base: bool = False
    whole: Tensor | None = None


def combination_blend(job: MergeJob, stats: Combination, a: int, b: int) -> Tensor:
    """Elements [a, b) of the combination, rounded as (x_0 - base) c_0 + (x_1 - base) c_1 + ... (+ base): one
    float32 rounding per operation, in input order, into buffers kept by the calling thread."""
    if stats.whole is not None:
        return stats.whole[a:b]
    if stats.terms:
        from composer import native

        fused = native.combination(job.read_raw(job.base, a, b) if stats.base else None,
                                   [job.read_raw(k, a, b) for k, _ in stats.terms],
                                   [float(c) for _, c in stats.terms])  # the same bits in one pass
        if fused is not None:
            return fused
    rows = scratch("geometric-blend", 3, b - a)
    acc, term, base = rows[0], rows[1], rows[2]
    if not stats.terms:
        return acc.zero_()
    if stats.base:
        job.read(job.base, a, b, base)
    for i, (k, c) in enumerate(stats.terms):
        x = job.read(k, a, b, term if i else acc)
        if stats.base:
            x.sub_(base)
        x.mul_(c)
        if i:
            acc.add_(x)
    return acc.add_(base) if stats.base else acc


def _vectors(job: MergeJob, a: int, b: int) -> Tensor:
    """float32 [n, b - a]: elements [a, b) of the job's inputs, minus the base's where it has one (as multislerp
    subtracts it, in float32), in a buffer kept by the calling (pass) thread."""
    with_base = job.base is not None
    rows = scratch("geometric-pass", len(job.inputs) + with_base, b - a)
    for row, k in zip(rows, job.inputs):
        job.read(k, a, b, row)
    if not with_base:
        return rows
    rows[:-1].sub_(job.read(job.base, a, b, rows[-1]))
    return rows[:-1]


def _gram(job: MergeJob) -> Tensor:
    return sum(job.each(lambda a, b: gram_sums(_vectors(job, a, b)), job.steps()))


def _whole(job: MergeJob) -> Combination:
    """The formula on the whole tensor (of at most one block): mergekit's float32 arithmetic."""
    inputs = [job.read(k) for k in range(len(job.tensor.inputs))]
    base = None if job.base is None else inputs[job.base]
    return Combination(whole=job.method.compute(job, base, [inputs[k] for k in job.inputs]).reshape(-1))


def _f32(values: Tensor) -> list[Tensor]:
    return list(values.to(torch.float32).unbind())


def karcher_prepare(job: MergeJob) -> Combination:
    if job.numel <= job.block:
        return _whole(job)
    if len(job.inputs) == 1:
        return Combination(((job.inputs[0], torch.ones(())),))
    coefficients = karcher_coefficients(_gram(job), max_iter=int(job.shared["max_iter"]), tol=job.shared["tol"])
    return Combination(tuple((k, c) for k, c, c64 in zip(job.inputs, _f32(coefficients), coefficients) if c64 != 0))


CANCELLED = 1e-3  # |m| below this share of sum |k_i| r_i: the weighted units (nearly) cancel


def multislerp_prepare(job: MergeJob) -> Combination:
    if job.numel <= job.block:
        return _whole(job)
    if len(job.inputs) == 1:  # returned as it is, base and weight unused
        return Combination(((job.inputs[0], torch.ones(())),))
    eps, with_base = job.shared["eps"], job.base is not None
    w = multislerp_weights(job.per_input["weight"], job.shared["normalize_weights"])
    gram = _gram(job)
    coefficients, cancel = multislerp_coefficients(gram, w, eps)
    if cancel.item() < CANCELLED:
        # |m| from G is then of the order of its rounding: measure the float32 m = sum w_i v_i / (r_i + eps) as
        # multislerp forms it (exactly zero for inputs that cancel exactly), and decide on it as multislerp does.
        denominators = (gram.diagonal().clamp(min=0).sqrt().to(torch.float32) + eps).reshape(-1, 1)

        def mean_square(a: int, b: int) -> Tensor:
            mean = ((_vectors(job, a, b) / denominators) * w.reshape(-1, 1)).sum(0)
            return mean.to(torch.float64).square().sum()

        mean_norm = sum(job.each(mean_square, job.steps())).sqrt()
        if mean_norm.item() < eps:
            if len(job.inputs) != 2:
                raise ValueError(
                    "multislerp: the weighted sum of the inputs' unit vectors is zero (antipodal inputs, or sets of "
                    "inputs, whose weights balance exactly, e.g. a and -a with equal weights): change the weights")
            return Combination(tuple(zip(job.inputs, w.unbind())), with_base)  # w_0 v_0 + w_1 v_1 (+ base)
        coefficients, _ = multislerp_coefficients(gram, w, eps, mean_norm)
    return Combination(tuple(zip(job.inputs, _f32(coefficients))), with_base)


KARCHER_STREAMING = Streaming("statistics", combination_blend, karcher_prepare)
MULTISLERP_STREAMING = Streaming("statistics", combination_blend, multislerp_prepare)
