"""Geometric merges: Karcher mean, Multi-SLERP and NearSwap, as mergekit 0.1.5 computes them, in float32."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import float32 as _float32, per_input as _per_input

# Each function repeats mergekit 0.1.5's operations in mergekit's order (merge_methods/karcher.py, multislerp.py,
# nearswap.py), so with a float32 recipe (`dtype: float32`, where mergekit computes in float32 too) the results are
# the same bits, in one process with one torch thread count (torch's whole-tensor float32 reductions, which both
# use, depend on it for large tensors). mergekit computes in the inputs' own dtype; these functions always in
# float32.
#
# Streaming over blocks of a tensor:
# - nearswap is elementwise: any block may be computed on its own, and the result is the same bits.
# - multislerp needs whole-tensor statistics: each model's norm |v_i|, then |m| of the weighted mean
#   m = sum w_i v_i / (|v_i| + eps), then the dots <u_i, m / |m|>, then the norm of the tangent sum; a fixed number
#   of statistics passes (four) and one elementwise pass give the same result mathematically, but not mergekit's
#   bits: mergekit takes each statistic as one float32 reduction over the whole tensor, whose error grows with the
#   tensor (torch's CPU float32 norm of a 1M-element tensor erred by 1.2e-5 relative, measured), so sums streamed
#   in float64 are closer to the exact result than mergekit is, and differ from it by about that much (measured:
#   max |difference| 6.7e-5 x rms of the result over 1M elements). Mathematically the tangent sum is zero
#   (sum w_i (u_i - <u_i, m^> m^) = m - |m| m^ = 0; 1e-15 in float64), so the result is m^ * sum w_i |v_i|
#   (+ base): two statistics passes (the norms |v_i|, then |m|) and an elementwise pass suffice for it.
# - karcher is whole-tensor: every one of up to max_iter iterations reads the whole current mean against every
#   unit vector, updates the mean, and renormalises it, branching on the scalars in between; streaming it would
#   take about 3 passes per iteration over a full-size intermediate, so it runs on whole tensors.

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
