"""Spherical merges: SLERP and NuSLERP, each a whole-tensor formula beside its streamed decomposition."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.averaging import block_angle_sums
from composer.methods.common import float32 as _float32, per_input as _per_input
from composer.methods.method import ROWS, MergeJob, MergeMethod, Param, Streaming, scratch

SLERP_CHUNK = 1024 * 1024  # elements per step of slerp's statistics pass (its float64 sums are grouped by these)
SLERP_RUN = 1024  # within a step, squared norms and the dot product are float32 sums over runs of this many elements


# ---------------------------------------------------------------------------------------------------- slerp


def slerp(base: Tensor, other: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation from base (t=0) to other (t=1), treating each tensor as one flat vector.

    Paper: "Animating rotation with quaternion curves", Shoemake 1985 (SIGGRAPH), https://doi.org/10.1145/325165.325242
    (mergekit cites https://en.wikipedia.org/wiki/Slerp).
    Locality: tensor (norms of both tensors and the angle between them). result = c0 * base + c1 * other with
    c0 = sin((1-t)θ)/sin θ, c1 = sin(tθ)/sin θ, cos θ = <base/|base|, other/|other|> clamped to [-1, 1]; norms
    below eps=1e-8 are replaced by 1; when |cos θ| > 0.9995 (near-parallel or antiparallel) it falls back to
    (1-t)*base + t*other, as mergekit does. cos θ comes from slerp_coefficients' float64 sums (mergekit reduces
    in float32, so its cos may differ in the last float32 bits: see there).
    """
    v0, v1 = _float32([base, other])
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    coef_a, coef_b = slerp_coefficients(lambda s, e: torch.cat([a[:, s:e], b[:, s:e]]), a.shape[1], t)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def slerp_sums(pair: Tensor) -> Tensor:
    """float64 [3]: |a|^2, |b|^2 and <a, b> of a float32 [2, n] block whose rows are a and b.

    One batched matrix product gives the float32 sums over runs of SLERP_RUN elements (each run reduced on one
    thread, so the result does not depend on torch's thread count, as one reduction over the block does); the runs
    are then summed in float64. Measured on 2**20-element blocks of bf16 weights: within 2 float32 ulps of the
    exact sums; float32 reductions over the whole block (vector_norm, a plain dot) err by 100 to 700.
    """
    n = pair.shape[1]
    whole = n - n % SLERP_RUN
    gram = torch.zeros(2, 2, dtype=torch.float64)
    if whole:
        runs = pair[:, :whole].reshape(2, -1, SLERP_RUN).transpose(0, 1)  # [runs, 2, SLERP_RUN], a view
        gram += torch.bmm(runs, runs.transpose(1, 2)).to(torch.float64).sum(0)
    if whole < n:
        tail = pair[:, whole:]
        gram += (tail @ tail.T).to(torch.float64)
    return torch.stack([gram[0, 0], gram[1, 1], gram[0, 1]])


def slerp_coefficients(
    read: Callable[[int, int], Tensor], numel: int, t: float,
    each: Callable[[Callable[[int, int], Any], list[tuple[int, int]]], Iterable[Any]] | None = None,
) -> tuple[Tensor, Tensor]:
    """SLERP's whole-tensor statistics in one streamed pass: (c0, c1), each of shape [1, 1], such that the result
    is c0 * base + c1 * other elementwise. `read(start, stop)` returns the float32 [2, stop - start] elements of the
    flattened base (row 0) and other (row 1); they are read once, in steps of SLERP_CHUNK elements, whose
    slerp_sums are added in order, so the result does not depend on who reads or where the tensor is cut into
    output chunks. `each(fn, chunks)` runs fn on every step and returns the results in order (default: one by
    one; the caller may run steps on several threads, as long as `read` is safe to call from them).

    mergekit 0.1.5 takes two float32 passes (the norms, then the dot product of the normalised vectors), whose
    bits depend on torch's thread count for tensors over ~32K elements. Here cos θ is the float64
    <a, b> / (|a| |b|), rounded once to float32; from there the arithmetic is mergekit's, in float32.
    """
    tt = torch.tensor([float(t)], dtype=torch.float32).reshape(-1, 1)
    if not numel:
        return 1 - tt, tt
    dot_threshold, eps = 0.9995, 1e-8
    each = each or (lambda fn, chunks: [fn(s, e) for s, e in chunks])
    steps = [(s, min(numel, s + SLERP_CHUNK)) for s in range(0, numel, SLERP_CHUNK)]
    sums = torch.zeros(3, dtype=torch.float64)
    for part in each(lambda s, e: slerp_sums(read(s, e)), steps):
        sums += part
    norms = sums[:2].sqrt()
    norms = torch.where(norms > eps, norms, 1)
    dot = (sums[2] / (norms[0] * norms[1])).to(torch.float32).reshape(1, 1).clamp(-1, 1)
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



def nuslerp_angle(sums: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """(sin((1 - t) theta), sin(t theta), sin theta) of nuslerp's flattened vectors v0, v1 (the inputs, or their
    task vectors with a base) from their angle_sums; None when they are colinear. One vector is one column."""
    s0, s1, sin_theta, colinear = nuslerp_column_angles(sums.reshape(3, 1), t)  # [|v0|^2, |v1|^2, <v0, v1>]
    return None if colinear.item() else (s0.reshape(()), s1.reshape(()), sin_theta.reshape(()))


def nuslerp_blend(v0: Tensor, v1: Tensor, t: float, angle: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """nuslerp's elementwise step, rounded as _nuslerp rounds it."""
    if angle is None:
        return (1 - t) * v0 + t * v1
    s0, s1, sin_theta = angle
    return (s0 * v0 + s1 * v1) / sin_theta


def column_sums(v0: Tensor, v1: Tensor) -> Tensor:
    """float64 [3, C]: for each column of two [rows, C] blocks, |v0|^2, |v1|^2 and <v0, v1> over the block's rows
    (nuslerp_row_wise: its vectors run along dim 0)."""
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    return torch.stack([(a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])


def nuslerp_column_angles(sums: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sin((1 - t) theta), sin(t theta), sin theta, colinear), float32 [C] each, of nuslerp's per-column vectors
    from their column_sums, as _nuslerp computes them for each column."""
    norm0, norm1 = sums[0].sqrt().clamp(min=1e-7), sums[1].sqrt().clamp(min=1e-7)
    cos = (sums[2] / (norm0 * norm1)).to(torch.float32).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    return torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta), colinear


def nuslerp_column_blend(v0: Tensor, v1: Tensor, t: float, angles: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """nuslerp's elementwise step for [rows, C] blocks with one angle per column, rounded as _nuslerp rounds it."""
    s0, s1, sin_theta, colinear = angles
    return torch.where(colinear, (1 - t) * v0 + t * v1, (s0 * v0 + s1 * v1) / sin_theta)


def nuslerp_t(weights: Sequence[float]) -> float:
    """t = w1 / (w0 + w1), or 0.5 when |w0 + w1| < 1e-6."""
    w = [float(x) for x in weights]
    return 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)


# ----------------------------------------------------------------------------------------------- the methods


def _slerp_formula(base: Tensor, xs: list[Tensor], s: dict, p: dict, g) -> Tensor:
    if len(xs) != 1:
        raise ValueError(f"slerp merges a base and exactly one other tensor, got {len(xs)} others")
    return slerp(base, xs[0], s["t"])


def _slerp_prepare(job: MergeJob) -> tuple[Tensor, Tensor]:
    """c0 and c1 from one streamed pass over both inputs, steps on both cores, each step read into a [2, step]
    buffer kept by its pass thread."""
    other = job.inputs[0]

    def read(s: int, e: int) -> Tensor:
        pair = scratch("slerp", 2, SLERP_CHUNK)
        job.read(job.base, s, e, pair[0])
        job.read(other, s, e, pair[1])
        return pair[:, : e - s]

    return slerp_coefficients(read, job.numel, job.shared["t"], each=job.each)


def _slerp_blend(job: MergeJob, coefficients: tuple[Tensor, Tensor], a: int, b: int) -> Tensor:
    from composer import native

    c0, c1 = (c.reshape(()) for c in coefficients)  # 0-dim: a [1, 1] broadcast over 1-D blocks is 20x slower
    fused = native.combination(None, [job.read_raw(job.base, a, b), job.read_raw(job.inputs[0], a, b)],
                               [float(c0), float(c1)])  # base * c0 + other * c1: the same bits in one pass
    if fused is not None:
        return fused
    pair = scratch("blend", 2, b - a)
    x = job.read(job.base, a, b, pair[0]).mul_(c0)
    y = job.read(job.inputs[0], a, b, pair[1]).mul_(c1)
    return x.add_(y)  # rounds as c0 * base + c1 * other: two products, then their sum


SLERP = MergeMethod(
    name="slerp",
    title="Animating rotation with quaternion curves (Shoemake 1985)",
    url="https://doi.org/10.1145/325165.325242",
    summary="along the great circle from the base (t = 0) to the other model (t = 1)",
    params=(Param("t", low=0, high=1, why="from 0 (the base model) to 1 (the other model)"),),
    formula=_slerp_formula,
    min_inputs=2,
    max_inputs=2,
    min_others=1,
    max_others=1,
    streaming=lambda job: Streaming("statistics", _slerp_blend, _slerp_prepare),
)


def _vectors(job: MergeJob, a: int, b: int, width: int | None = None) -> tuple[list[Tensor], Tensor | None]:
    """nuslerp's two vectors over elements [a, b) (the inputs, or their task vectors with a base), and the base;
    [rows, width] blocks when `width` is given."""
    xs, base = job.read_inputs(a, b), job.read_base(a, b)
    if width is not None:
        xs, base = [x.reshape(-1, width) for x in xs], None if base is None else base.reshape(-1, width)
    return (xs if base is None else [x - base for x in xs]), base


def _angle_prepare(job: MergeJob):
    """Flattened: one angle per tensor, from float64 sums streamed over blocks."""
    def vectors(a: int, b: int) -> list[Tensor]:
        return _vectors(job, a, b)[0]

    total = sum(job.each(lambda a, b: block_angle_sums(vectors, a, b, job.read_raw_all), job.steps()))
    weight = nuslerp_t(job.per_input["weight"])
    return weight, nuslerp_angle(total, weight)


def _angle_blend(job: MergeJob, stat, a: int, b: int) -> Tensor:
    from composer import native

    t, angle = stat
    base = None if job.base is None else job.read_raw(job.base, a, b)
    xs = [job.read_raw(k, a, b) for k in job.inputs]
    # nuslerp_blend's (s0 v0 + s1 v1) / sin_theta, or (1 - t) v0 + t v1 (the scalars rounded to float32 as torch
    # rounds them), plus the base: the same bits in one pass
    fused = native.combination(base, xs, [float(c) for c in angle[:2]], divisor=float(angle[2])) if angle else \
        native.combination(base, xs, [float(torch.tensor(1 - t, dtype=torch.float32)),
                                      float(torch.tensor(t, dtype=torch.float32))])
    if fused is not None:
        return fused
    (v0, v1), base = _vectors(job, a, b)
    merged = nuslerp_blend(v0, v1, *stat)
    return merged if base is None else base + merged


def _columns(job: MergeJob) -> int:
    return job.shape[-1] if len(job.shape) == 2 else 1  # a 1-D tensor is one column


def _column_prepare(job: MergeJob):
    """nuslerp_row_wise: float64 sums per column, streamed over blocks of whole rows."""
    width = _columns(job)
    steps = job.steps(job.rows(job.block, width)[1])
    total = sum(job.each(lambda a, b: column_sums(*_vectors(job, a, b, width)[0]), steps))
    weight = nuslerp_t(job.per_input["weight"])
    return weight, nuslerp_column_angles(total, weight)


def _column_blend(job: MergeJob, stat, a: int, b: int) -> Tensor:
    (v0, v1), base = _vectors(job, a, b, _columns(job))
    merged = nuslerp_column_blend(v0, v1, *stat)
    return (merged if base is None else base + merged).reshape(-1)


_ANGLE = Streaming("statistics", _angle_blend, _angle_prepare)
_COLUMNS = Streaming("column statistics", _column_blend, _column_prepare,
                     grid=lambda job: job.rows(job.chunk, _columns(job))[1])


def _nuslerp_streaming(job: MergeJob) -> Streaming | None:
    if job.shared["nuslerp_flatten"]:
        return _ANGLE
    if len(job.shape) > 2:
        return None
    return _COLUMNS if job.shared["nuslerp_row_wise"] else ROWS


NUSLERP = MergeMethod(
    name="nuslerp",
    title="Animating rotation with quaternion curves (Shoemake 1985); NuSLERP is mergekit's variant",
    url="https://doi.org/10.1145/325165.325242",
    summary="slerp between two models by weight, optionally of their task vectors from a base",
    params=(Param("weight", per_input=True, low=0, why="a share of the interpolation, t = w1 / (w0 + w1)"),
            Param("nuslerp_row_wise", False, kind="bool"), Param("nuslerp_flatten", True, kind="bool")),
    formula=lambda base, xs, s, p, g: nuslerp(xs, p["weight"], base=base, nuslerp_row_wise=s["nuslerp_row_wise"],
                                              nuslerp_flatten=s["nuslerp_flatten"]),
    base="optional",
    min_others=2,
    max_others=2,
    streaming=_nuslerp_streaming,
)

METHODS = (SLERP, NUSLERP)
