"""DARE and DELLA: task arithmetic on randomly dropped task vectors (a Bernoulli mask; DELLA's keep probability
rising with magnitude), with the L1 rescale; masks are drawn per block of a fixed grid so any chunk can draw its
part in any order."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import (PackedMasks, add_l1_lanes, l1_total, pack_mask, per_input as _per_input,
                                     unpack_mask)
from composer.methods.method import MergeJob, Param, Streaming, scratch
from composer.methods.sparsify import _bernoulli, _della_magprune, bernoulli, della_mask, key_at, stream_key
from composer.methods.taskvectors import _task_arithmetic, gta_method
from composer.native import LANES

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
    exactly and the mean in expectation. Masks are drawn as uniform < density from `generator` (sparsify.bernoulli), model by model
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


# ------------------------------------------------------------------------------------------ streamed masks
#
# Each task vector's mask is drawn per block of a fixed grid from a generator seeded by (--seed, tensor, model,
# block), so any chunk can draw its part in any order; the L1 rescale factors are streamed first. DARE's grid is
# job.block elements; DELLA's is whole rows (it ranks |delta| within each row), as many as fit in
# DELLA_ELEMENTS (its sorts make int64 and float32 temporaries of the block's size: at 1M elements they
# kept the pass threads' heaps at 1.4 GB).


DELLA_ELEMENTS = 1 << 18


def _grid(job: MergeJob) -> int:
    return job.rows(min(job.block, DELLA_ELEMENTS))[1] if job.method.name.startswith("della") else job.block


def _masks(job: MergeJob, a: int, b: int, deltas: list[Tensor] | None = None) -> list:
    """The masks of grid block [a, b) (None: keep all); DELLA's need that block's deltas."""
    grid, della = _grid(job), "epsilon" in job.per_input
    out = []
    for i, d in enumerate(float(x) for x in job.per_input["density"]):
        generator = job.generator(f"{i}:{a // grid}")
        if d >= 1:
            out.append(None)
        elif della:
            deltas = deltas if deltas is not None else job.deltas(a, b)
            width = job.rows(min(job.block, DELLA_ELEMENTS))[0]
            out.append(della_mask(deltas[i].reshape(-1, width), d, float(job.per_input["epsilon"][i]),
                                  generator).reshape(-1))
        else:  # into a buffer the thread keeps: a fresh 4 MiB one per block is a fresh mmap, page faults included
            out.append(bernoulli(d, (b - a,), generator, out=scratch("dare-masks", len(job.inputs), b - a)[i]))
    return out


def _random_prepare(job: MergeJob) -> tuple[list, PackedMasks | None]:
    """The L1 rescale factor of each task vector, |delta|_1 / |kept delta|_1 over the whole tensor (None: none),
    and the masks this pass drew, per grid block, packed as bits (composer.methods.common.PackedMasks: 1/32 of
    float32's size, 16 MB for a 65M-element tensor's two masks), which the blend unpacks instead of drawing (or,
    for DELLA, ranking) again: that halves the random draws and DELLA's sorts. None: no rescale, no pass."""
    densities = [float(d) for d in job.per_input["density"]]
    factors = [None] * len(job.inputs)
    if not (job.shared["rescale"] and any(d < 1 for d in densities)):
        return factors, None

    grid = _grid(job)
    packed = PackedMasks(job.numel, grid, len(job.inputs))

    def norms(a: int, b: int) -> list:
        # the sums as Python floats and the masks into `packed`: nothing this block made outlives it (see
        # PackedMasks). Each sum is add_l1_lanes' fixed order over the block, so kernel and torch agree.
        from composer import native, ranked  # imports torch: not at planning time

        lanes = [None if d >= 1 else torch.zeros(2, LANES, dtype=torch.float64) for d in densities]
        if "epsilon" in job.per_input:  # DELLA ranks within the block's rows: its deltas whole
            width = job.rows(min(job.block, DELLA_ELEMENTS))[0]
            base, xs = job.read_raw_all(a, b)
            for i, d in enumerate(densities):
                if d >= 1:
                    continue
                epsilon = float(job.per_input["epsilon"][i])
                key = stream_key(job.generator(f"{i}:{a // grid}")) if d > 0 else None  # as della_mask draws
                if key is not None and native.della_pass(xs[i], base, width, d, epsilon, key, packed.slot(a, b, i),
                                                         lanes[i]):  # deltas, ranks, mask and sums in one call
                    continue
                delta = xs[i].float() - base.float()
                m = della_mask(delta.reshape(-1, width), d, epsilon, None, key=key).reshape(-1)
                add_l1_lanes(delta, m, lanes[i])
                packed.put(a, b, i, m)
        else:
            keys = [None if d >= 1 else stream_key(job.generator(f"{i}:{a // grid}"))  # _masks' draw, as it draws
                    for i, d in enumerate(densities)]
            for pa, pb in ranked.pieces(a, b):  # 1 MiB temporaries; PIECE: a multiple of LANES and of 8 (bytes)
                base, xs = job.read_raw_all(pa, pb)
                for i, (x, key) in enumerate(zip(xs, keys)):
                    if key is None:
                        continue
                    bits = packed.slot(a, b, i)[(pa - a) // 8:]
                    key_here = key_at(key, pa - a)  # the block's stream from this piece's first element
                    if native.dare_pass(x, base, key_here, densities[i], bits, lanes[i]):  # all in one pass
                        continue
                    m = bernoulli(densities[i], pb - pa, None, key=key_here)
                    add_l1_lanes(x.float() - base.float(), m, lanes[i])
                    pack_mask(m, bits[: -(-(pb - pa) // 8)])
        return [None if row is None else l1_total(row) for row in lanes]

    sums = [[0.0, 0.0] for _ in job.inputs]
    for part in job.each(norms, job.steps(grid)):
        for acc, got in zip(sums, part):
            if got is not None:
                acc[0] += got[0]
                acc[1] += got[1]
    for i, (before, after) in enumerate(sums):
        before, after = torch.tensor(before).float(), torch.tensor(after).float()
        if densities[i] < 1 and before >= 1e-7 and after >= 1e-7:
            factors[i] = before / after
    return factors, packed


def _random_blend(job: MergeJob, stats: tuple[list, PackedMasks | None], ga: int, gb: int) -> Tensor:
    """Grid block [ga, gb): its masks (kept from the rescale pass, or drawn now), then the merge in steps of
    job.chunk elements."""
    from composer import native
    from composer.methods.taskvectors import _native_blend, merge_deltas

    factors, packed = stats
    della = "epsilon" in job.per_input  # ranks within the block's rows: its inputs whole
    kept = None if packed is None else [None if float(d) >= 1 else packed.slot(ga, gb, i)
                                        for i, d in enumerate(job.per_input["density"])]
    held = [job.read(k, ga, gb) for k in (job.base, *job.inputs)] if della and kept is None else None
    drawn = None if kept is not None else _masks(job, ga, gb, [x - held[0] for x in held[1:]] if held else None)
    out = torch.empty(gb - ga)
    for a in range(ga, gb, job.chunk):
        b = min(gb, a + job.chunk)
        if kept is not None:
            masks = [None if m is None else native.Packed(m, a - ga) for m in kept]  # unpacked if torch blends
        else:
            masks = [None if m is None else m[a - ga: b - ga] for m in drawn]

        def sparsify(i: int, d: Tensor, masks: list = masks) -> Tensor:
            if masks[i] is None:
                return d
            d.mul_(masks[i])  # in place: d is the merge's own copy
            return d if factors[i] is None else d.mul_(factors[i])

        if held:
            base, *xs = (x[a - ga: b - ga] for x in held)
        else:  # the files' bfloat16, which the kernel converts as it loads
            base, xs = job.read_raw_all(a, b)
        # the same bits in one pass, where it is built, written in place
        if _native_blend(job, base, xs, masks, factors, out=out[a - ga: b - ga]) is None:
            masks[:] = [unpack_mask(m.data, m.start, m.start + b - a) if isinstance(m, native.Packed) else m
                        for m in masks]
            out[a - ga: b - ga] = merge_deltas(job, base, xs, sparsify)  # which converts raw bfloat16 first
    return out


_RANDOM = Streaming("random", _random_blend, _random_prepare, grid=_grid)


def _della_check(job: MergeJob) -> str | None:
    for model, density, epsilon in zip(job.models, job.per_input["density"], job.per_input["epsilon"]):
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            return (f"density {density} +/- epsilon {epsilon} leaves (0, 1): choose epsilon below "
                    f"{min(density, 1 - density):g} for model '{model}'")
    return None


_DARE = ("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
         "https://arxiv.org/abs/2311.03099")
_DELLA = ("DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
          "https://arxiv.org/abs/2406.11617")
_EPSILON = Param("epsilon", 0.15, per_input=True, low=0, high=1, open_high=True,
                 why="the spread of the keep probabilities around density")
_DELLA_STREAM = lambda job: _RANDOM if len(job.shape) <= 2 else None  # noqa: E731 (ranks along dim 1: rows of 2-D)

METHODS = (
    gta_method("dare_ties", *_DARE, "drop task-vector entries at random (kept with probability density), "
               "rescale, elect signs", dare_ties, consensus=True, normalize=False, rescale=True,
               streaming=lambda job: _RANDOM, random=True),
    gta_method("dare_linear", *_DARE, "drop task-vector entries at random (kept with probability density), "
               "rescale, add", dare_linear, consensus=False, normalize=False, rescale=True,
               streaming=lambda job: _RANDOM, random=True),
    gta_method("della", *_DELLA, "random drop with keep probability rising with magnitude (density +/- epsilon), "
               "elect signs", della, consensus=True, normalize=True, rescale=True, extra=(_EPSILON,),
               streaming=_DELLA_STREAM, check=_della_check, random=True),
    gta_method("della_linear", *_DELLA, "random drop with keep probability rising with magnitude, add",
               della_linear, consensus=False, normalize=False, rescale=True, extra=(_EPSILON,),
               streaming=_DELLA_STREAM, check=_della_check, random=True),
)
