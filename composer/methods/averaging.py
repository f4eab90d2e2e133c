"""Averaging merges: linear and Model Stock, each a whole-tensor formula beside its streamed decomposition."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import float32 as _float32, lane_totals, per_input as _per_input
from composer.methods.method import ELEMENTWISE, ROWS, MergeJob, MergeMethod, Param, Streaming, weights_sum

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


ANGLE_LANES = 8  # float64 lanes per sum in add_angle_lanes: the kernel's adds in two independent chains


def _pairs(n: int) -> list[tuple[int, int]]:
    """(i, i) for each vector, then (i, j) for every pair i < j, row by row: angle_sums' order."""
    return [(i, i) for i in range(n)] + [(i, j) for i in range(n) for j in range(i + 1, n)]


def add_angle_lanes(vectors: Sequence[Tensor], lanes: Tensor) -> None:
    """Add the float64 products v_i * v_i, then v_i * v_j (i < j), of float32 vectors (each product exact) to
    `lanes` [pairs, ANGLE_LANES]: element k into lane k % ANGLE_LANES, each lane in index order (a run of calls
    must give each a multiple of ANGLE_LANES elements until the last). The native kernel (composer.native
    .angle_lanes) sums in the same order, so the two give the same bits."""
    v = [x.reshape(-1).double() for x in vectors]
    for q, (i, j) in enumerate(_pairs(len(v))):
        products = torch.nn.functional.pad(v[i] * v[j], (0, -v[i].numel() % ANGLE_LANES))
        lanes[q] = torch.cat([lanes[q][None], products.view(-1, ANGLE_LANES)]).cumsum(0)[-1]  # in index order


def block_angle_sums(vectors: Callable[[int, int], Sequence[Tensor]], a: int, b: int,
                     raw: Callable[[int, int], tuple[Tensor | None, Sequence[Tensor]]] | None = None) -> Tensor:
    """float64 [n + n(n-1)/2] of elements [a, b) of the vectors `vectors(a, b)` returns: each one's squared norm,
    then the dot product of every pair i < j, summed in add_angle_lanes' order over pieces (composer.ranked
    .pieces), each sum's lanes then added in lane order. `raw(a, b)`, where given, returns the (base or None,
    inputs) whose differences (or which themselves, without a base) the vectors are, as MergeJob.read_raw_all
    gives them: the native kernel then reads them in one pass (the same bits)."""
    from composer import native, ranked

    lanes = None
    for pa, pb in ranked.pieces(a, b):
        base, xs = raw(pa, pb) if raw is not None else (None, None)
        if xs is not None:
            lanes = torch.zeros(len(_pairs(len(xs))), ANGLE_LANES, dtype=torch.float64) if lanes is None else lanes
            if native.angle_lanes(base, xs, lanes):
                continue
        v = vectors(pa, pb)
        lanes = torch.zeros(len(_pairs(len(v))), ANGLE_LANES, dtype=torch.float64) if lanes is None else lanes
        add_angle_lanes(v, lanes)
    return torch.tensor(lane_totals(lanes), dtype=torch.float64)


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




# ----------------------------------------------------------------------------------------------- the methods


LINEAR = MergeMethod(
    name="linear",
    title="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
    "inference time",
    url="https://arxiv.org/abs/2203.05482",
    summary="a weighted average (weights normalised to sum 1 unless normalize: false)",
    params=(Param("weight", per_input=True), Param("normalize", True, kind="bool")),
    formula=lambda base, xs, s, p, g: linear(xs, p["weight"], normalize=s["normalize"]),
    base="ignored",
    streaming=lambda job: ELEMENTWISE,
    check=weights_sum,
)


def _stock_prepare(job: MergeJob) -> Tensor:
    """t from the angles between the whole task vectors: float64 sums streamed over blocks."""
    total = sum(job.each(lambda a, b: block_angle_sums(job.deltas, a, b, job.read_raw_all), job.steps()))
    return model_stock_t(total, len(job.inputs))


def _stock_blend(job: MergeJob, t: Tensor, a: int, b: int) -> Tensor:
    from composer import native

    base, xs = job.read_raw_all(a, b)
    fused = native.combination(base, xs, [float(t), float(1 - t)], stock=True)  # the same bits in one pass
    return model_stock_blend(base.float(), [x.float() for x in xs], t) if fused is None else fused


_STOCK = Streaming("statistics", _stock_blend, _stock_prepare)

MODEL_STOCK = MergeMethod(
    name="model_stock",
    title="Model Stock: All we need is just a few fine-tuned models",
    url="https://arxiv.org/abs/2403.19522",
    summary="interpolate between the base and the fine-tunes' mean by their angle (two or more fine-tunes)",
    params=(Param("filter_wise", False, kind="bool"),),
    formula=lambda base, xs, s, p, g: model_stock(base, xs, filter_wise=s["filter_wise"]),
    min_inputs=3,
    min_others=2,
    # one angle per tensor: streamed statistics; per row (filter_wise): blocks of whole rows
    streaming=lambda job: _STOCK if not job.shared["filter_wise"] else ROWS if len(job.shape) <= 2 else None,
)

METHODS = (LINEAR, MODEL_STOCK)
