"""The fusion methods: SCE (select, calculate, erase), Arcee Fusion (KL-weighted importance gate) and the RAM
pair (Reinforced Agent Merging: unique deltas kept, shared ones averaged), as in mergekit 0.1.5."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from composer import ranked
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import PackedMasks, float32 as _float32, lane_totals, unpack_mask
from composer.methods.method import MergeJob, Streaming, scratch
from composer.methods.taskvectors import _sign_consensus

# Checked against mergekit 0.1.5 (merge_methods/sce.py, arcee_fusion.py, ram.py): the same torch operations in the
# same order, on float32 inputs. mergekit computes in the inputs' own (promoted) dtype, so with `dtype: float32` the
# two agree bit for bit (the merge engine streams them, below: bit for bit too, except sce's weights); on
# bfloat16/float16 inputs mergekit rounds every intermediate (deltas, variances, weights, softmaxes, sums) to that
# dtype, while composer computes in float32 and rounds once.
#
# How each streams over blocks of a tensor (composer.methods.method.Streaming; the streamed functions sit below
# each formula, the registry entries in extra.py). Peak memory: per input a few float32 temporaries of
# CHUNK_ELEMENTS (the statistics passes take blocks of ranked.BLOCK elements on the pass threads, each computed in
# such pieces; the blend steps are that size), plus statistics of a few numbers per model or per row; never a
# whole tensor, except a 1-D one in arcee_fusion (one row).
# - ram: elementwise. The per-element contributor count runs over models, never over the tensor, so any block can
#   be merged on its own (formula_blend).
# - ramplus_tl ("statistics"): one pass counting, per model, the elements where it is nonzero and shared
#   (contributor count > 1) and where it is nonzero and unique (count == 1): integers, so the blocks' sums are
#   exact and equal the whole tensor's; lambda_i is then computed from them as the formula computes it, and each
#   block is the formula's arithmetic with those lambdas: bit for bit the formula. (ram's blend, ramplus_tl's
#   counts and blend run natively where the kernels are built: composer.native.ram, the same bits; so do sce's
#   passes and blend, and arcee_fusion's sample and gate: composer.native.sce_*, sort_positions, fusion_*.)
# - sce ("statistics", or "ranked" with select_topk < 1): with select_topk < 1 the top k of the per-element
#   variance across models found by composer.ranked.select (histograms of var's float32 bit patterns, var
#   recomputed per block from the inputs, bit for bit torch.var's (_sce_variance); k = int(count * select_topk)
#   as the formula takes it, the nonzero count read off the first pass's histogram; exact ties at the cut keep
#   the earlier elements, as the formula does; natively, pass 1 computes the variance and counts its keys in one
#   pass, storing none): the formula's selection, exactly. Then a pass for the per-model sums of the squared
#   (masked) task vectors, which keeps each block's mask packed for the blend: the float32 squares summed in
#   float64, in fixed lanes within a block (add_square_lanes; natively the variance, mask, squares and sums in one
#   pass, composer.native.sce_masked_squares), the blocks in order, rounded to float32 and
#   divided by numel, as torch's float32 mean divides its float32 sum; the weights, the sign election and the
#   weighted mean are then the formula's, per block. The formula (and mergekit) sum the squares in float32 over
#   the whole tensor: the streamed mean squares are correctly rounded where torch's may be a few float32 ulps
#   off, so the weights (and through them the output) may differ from the formula's in the last bits.
# - arcee_fusion ("row statistics"): one pass over blocks of whole rows (at least two rows each: torch splits a
#   lone long row's reduction over threads, which rounds differently) computes the per-row KL (one float per row,
#   kept) and the importances the threshold needs: all of them (at most 4 MB) when numel <= 1M, else those at the
#   1M sampled positions, drawn up front from the job's generator exactly as the formula draws them (one
#   torch.randint call) and gathered block by block; sorted, they give the formula's quantiles. Each output block
#   is then elementwise: importance = |x - base| * its row's KL against that threshold. Bit for bit the formula.


# ------------------------------------------------------------------------------------------------------- SCE


def sce(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """SCE: select the elements where the models vary most, weight each model by its task vector's mean square,
    erase minority signs, then a disjoint weighted mean.

    Paper: https://arxiv.org/abs/2408.07990 (the reference mergekit names for SCE).
    Formula, with d_i = x_i - base over the n non-base models:
      select (only when select_topk < 1): var = Var_i(d_i) per element (population variance, unbiased=False);
        k = int(count_nonzero(var) * select_topk) (the product taken in float32, as mergekit does); keep the k
        elements of largest var, zero d_i elsewhere for every model (select_topk <= 0: all zeroed);
      calculate: w_i = mean(d_i ** 2) / sum_j mean(d_j ** 2), or w_i = 1/n when that sum is below 1e-6 (as in
        mergekit: small task vectors, RMS below ~1e-3 / sqrt(n), get equal weights);
      erase: m_i = [sign(d_i) == sign(sum_j d_j)] (+1 at a zero sum; zeros never match);
      merged = base + sum_i(w_i m_i d_i) / max(sum_i(w_i m_i), 1e-6).
    Parameters (mergekit's, both shared): select_topk (1.0; meaningful in (0, 1]; >= 1 selects everything),
    int8_mask (False; only the masks' storage dtype in mergekit, never the result). There is no `weight`.
    No non-base tensors: returns base.
    Differs from mergekit only at exact ties of var at the top-k cut: composer keeps the earlier elements (flat
    index order); mergekit's torch.topk picks among equal values in an unspecified order (whatever its kernel
    yields). Such ties are rare for float32-trained deltas but the rule, not the exception, for checkpoints stored
    in bfloat16, whose deltas take few distinct values: there the two keep different elements of the tied run.
    The merge engine streams it (sce_streaming): the same selection, and mean squares summed in float64 over
    blocks, so its weights (and output) may differ from this function's in the last float32 bits.
    """
    xs = _float32([base, *tensors])
    b, xs = xs[0], xs[1:]
    if not xs:
        return b
    deltas = torch.stack([x - b for x in xs], dim=0)
    if select_topk < 1:
        deltas = deltas * _sce_mask(deltas, select_topk).unsqueeze(0)
    return _sce_erase_mean(b, deltas, _sce_weights(deltas), int8_mask)


def _sce_erase_mean(b: Tensor, deltas: Tensor, w: Tensor, int8_mask: bool) -> Tensor:
    """Erase and the disjoint weighted mean: elementwise, given the per-model weights w."""
    keep = _sign_consensus(deltas, torch.int8 if int8_mask else torch.float32)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    erased = w * keep
    merged = (deltas * erased).sum(dim=0)
    return b + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _sce_weights(deltas: Tensor) -> Tensor:
    """Per-model mean squares, normalized to sum 1 (mergekit's sce_weight); equal weights below a 1e-6 sum."""
    return _sce_normalized(deltas.square().reshape(deltas.shape[0], -1).mean(dim=1))


def _sce_normalized(weights: Tensor) -> Tensor:
    """The mean squares [n] normalized to sum 1, or 1/n each when their sum is below 1e-6."""
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def _sce_mask(deltas: Tensor, density: float) -> Tensor:
    """1 at the k = int(count_nonzero(var) * density) elements of largest variance across models, else 0 (mergekit's
    sce_mask). Among equal variances at the cut the earlier elements (flat index) are kept."""
    if density <= 0:
        return torch.zeros_like(deltas[0])
    if density >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var)
    flat = var.abs().reshape(-1)
    cut = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    keep = flat > cut
    ties = torch.nonzero(flat == cut).flatten()[: k - int(keep.sum())]
    keep[ties] = True
    return keep.to(var.dtype).reshape(var.shape)


def _sce_variance(deltas: Tensor) -> Tensor:
    """torch.var(deltas, dim=0, unbiased=False), bit for bit, several times faster: torch's CPU kernel reduces each
    element's n values with Welford's updates in float64 (WelfordOps: delta = x - mean, mean += delta / k,
    m2 += delta * (x - mean)), element by element; here the same float64 operations in the same order over the
    whole block at once, then the same m2 / n rounded to the input's dtype. The first update is skipped: it sets
    mean = x[0] and adds x[0] * 0 to m2, which only NaN or Inf would change (and they make the variance NaN
    whatever). Without torch's m2 = +0.0 to start from, a zero variance may come out as -0.0: equal to torch's
    +0.0 (torch.equal), and the same once SCE takes its abs()."""
    x = deltas.to(torch.float64)
    n = x.shape[0]
    if n == 1:
        return (x[0] * (x[0] - x[0])).to(deltas.dtype)
    mean, m2 = x[0], None
    for k in range(1, n):
        delta = x[k] - mean
        mean = mean + delta / (k + 1)
        term = delta.mul_(x[k] - mean)
        m2 = term if m2 is None else m2.add_(term)
    return m2.div_(n).to(deltas.dtype)


def _pieces(job: MergeJob, a: int, b: int) -> list[tuple[int, int]]:
    """[a, b) in steps of job.chunk elements. The statistics passes run on the pass threads in blocks of job.block
    elements, each computed in these pieces: temporaries of 1-2 MB, which malloc hands out again and again, where
    whole-block ones (4-8 MB each, a dozen per block) piled up in the pass threads' heaps (measured: 0.5 GB)."""
    return [(s, min(b, s + job.chunk)) for s in range(a, b, job.chunk)]


def _sce_prepare(job: MergeJob) -> tuple[PackedMasks | None, Tensor] | None:
    """The selection (with select_topk < 1, as a packed mask per block: composer.methods.common.PackedMasks) and the
    per-model weights, from passes over blocks (None: no models besides the base). The variance is computed
    in the selection's passes (the first also counting its zeros, for k) and once more in the mean squares' pass,
    which keeps the mask it makes for the blend: the blend computes none."""
    from composer import native, ranked  # imports torch: not at planning time

    if not job.inputs:
        return None
    topk = job.shared["select_topk"]
    keep = None
    if topk < 1:
        keep = ranked.Keep(None, None)  # select_topk <= 0: nothing selected
        if topk > 0:
            def variance(a: int, b: int) -> Tensor:
                out = torch.empty(b - a)
                for s, e in _pieces(job, a, b):
                    out[s - a: e - a] = _piece_variance(job, s, e)
                return out

            def ranges(zeros: list[int]) -> list[tuple[int, int]]:  # as int(count_nonzero(var) * density)
                return [(0, int(torch.tensor(job.numel - zeros[0]) * topk))]

            def histogram(a: int, b: int, hist: Tensor) -> bool:  # the variance and its keys in one pass
                return native.sce_var_hist(*job.read_raw_all(a, b), hist)

            def nth(a: int, b: int, bits: int, rank: int) -> int | None:
                return native.sce_nth_equal(*job.read_raw_all(a, b), bits, rank)

            keep = ranked.select(lambda a, b: [variance(a, b)], job.numel, ranges, False, vectors=1,
                                 histogram=histogram, nth=nth)[0]

    packed = None if keep is None else PackedMasks(job.numel, job.block, 1)

    def squares(a: int, b: int) -> list[float]:
        lanes, masks = torch.zeros(len(job.inputs), SQUARE_LANES, dtype=torch.float64), []
        for s, e in _pieces(job, a, b):
            base, xs = job.read_raw_all(s, e)
            mask = None if keep is None else torch.empty(e - s)
            steps = None if keep is None else keep.steps(s, e)  # None with a keep: it needs the comparisons
            if keep is not None and steps is None:  # an end of a cut run here: the comparisons, then the squares
                mask = keep.mask(_piece_variance(job, s, e, base, xs).abs(), s)
            if not native.sce_masked_squares(base, xs, steps, mask, lanes):  # the same bits in torch
                if keep is not None and steps is not None:
                    mask = keep.mask(_piece_variance(job, s, e, base, xs).abs(), s)
                add_square_lanes(_task_vectors(base, xs), mask, lanes)
            masks.append(mask)
        if packed is not None:
            packed.put(a, b, 0, torch.cat(masks))
        return lane_totals(lanes)  # Python floats: nothing this block made outlives it

    sums = torch.zeros(len(job.inputs), dtype=torch.float64)
    for part in job.each(squares, job.steps()):
        sums += torch.tensor(part, dtype=torch.float64)  # float64 [n], blocks added in order
    # torch's float32 mean is its float32 sum divided by numel: here the float64 sum rounded once, then divided
    return packed, _sce_normalized(sums.to(torch.float32) / job.numel)


SQUARE_LANES = 8  # float64 lanes per model in add_square_lanes


def add_square_lanes(deltas: Tensor, mask: Tensor | None, lanes: Tensor) -> None:
    """Add the float32 squares of the task vectors `deltas` [n, m] (times `mask` first, where given), as float64,
    to `lanes` [n, SQUARE_LANES]: element k into lane k % SQUARE_LANES, each lane in index order (a run of calls
    must give each a multiple of SQUARE_LANES elements until the last). The native pass
    (composer.native.sce_masked_squares) adds in the same order: the same bits, which torch's own sum's order
    (its build's, its size's) would not give."""
    squared = (deltas if mask is None else deltas * mask.unsqueeze(0)).square()
    for row, values in zip(lanes, squared):
        values = torch.nn.functional.pad(values.double(), (0, -values.numel() % SQUARE_LANES))
        row.copy_(torch.cat([row[None], values.view(-1, SQUARE_LANES)]).cumsum(0)[-1])  # cumsum: in index order


def _sce_blend(job: MergeJob, stats, a: int, b: int) -> Tensor:
    """Grid block [a, b) (the statistics passes' blocks: its packed mask), in steps of job.chunk elements."""
    if stats is None:
        return job.read_base(a, b)
    from composer import native

    masks, w = stats
    out = torch.empty(b - a)
    for s, e in _pieces(job, a, b):
        base, xs = job.read_raw_all(s, e)
        mask = None if masks is None else unpack_mask(masks.slot(a, b, 0), s - a, e - a)
        if native.sce_blend(base, xs, mask, w, out=out[s - a: e - a]) is None:  # the same bits in one pass
            deltas = _task_vectors(base, xs)
            if mask is not None:
                deltas.mul_(mask.unsqueeze(0))
            out[s - a: e - a] = _sce_erase_mean(_float32([base])[0], deltas, w, job.shared["int8_mask"])
    return out


def _piece_variance(job: MergeJob, a: int, b: int, base: Tensor | None = None, xs: list | None = None) -> Tensor:
    """_sce_variance of elements [a, b)'s task vectors (of `base` and `xs`, when read already), natively where
    the kernels are built (the same bits)."""
    from composer import native

    if xs is None:
        base, xs = job.read_raw_all(a, b)
    variance = native.sce_variance(base, xs)
    if variance is not None:
        return variance
    return _sce_variance(_task_vectors(base, xs))


def _task_vectors(base: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """The float32 task vectors [n, numel] of inputs as MergeJob.read_raw gives them (bfloat16 or float32)."""
    b, *converted = _float32([base, *xs])
    return torch.stack([x - b for x in converted], dim=0)


_SCE_STATISTICS = Streaming("statistics", _sce_blend, _sce_prepare, grid=lambda job: job.block)
_SCE_RANKED = Streaming("ranked", _sce_blend, _sce_prepare, grid=lambda job: job.block)


def sce_streaming(job: MergeJob) -> Streaming:
    """Ranked (the top-k variance cut first) when select_topk < 1, else the weights' statistics pass only."""
    return _SCE_RANKED if job.shared["select_topk"] < 1 else _SCE_STATISTICS


# ----------------------------------------------------------------------------------------------- Arcee Fusion

QUANTILE_SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


def arcee_fusion(base: Tensor, tensors: Sequence[Tensor], *, generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: take the model's value where its change is important, keep the base's elsewhere.

    Reference: Arcee AI, https://arcee.ai (mergekit names no paper).
    Formula, with x the one non-base model (softmax and the KL sum over the last dim, i.e. per row; a 1-D tensor
    is one row):
      p = softmax(x) + 1e-8, q = softmax(base) + 1e-8, KL = sum(p * log(p / q)) per row;
      importance = |x - base| * KL (of the element's row);
      threshold = median + 1.5 * (q3 - q1), the quantiles taken index-wise on the sorted importances:
        sorted[long(q * (n - 1))] for q = 0.25, 0.5, 0.75 (q * (n - 1) in float32, truncated);
      merged = base + (x - base) * [importance >= threshold].
    When the tensor has more than 1,000,000 elements the quantiles are those of 1,000,000 importances sampled with
    replacement: torch.randint(numel, (1_000_000,)) drawn from `generator`, or from torch's global generator when
    None (that is mergekit's behaviour: it always uses the global one, so with the same seed in each they draw the
    same positions). At or below 1,000,000 elements it is deterministic and draws nothing.
    No parameters. Inputs: the base and exactly one other model (ValueError otherwise); mergekit's optional-tensor
    policy passes a lone input through for optional tensors, which is the engine's business, not this function's.
    Same as mergekit in float32, sampling included.
    """
    if len(tensors) != 1:
        raise ValueError(f"arcee_fusion merges exactly one model into the base: got {len(tensors)} besides the base")
    b, x = _float32([base, *tensors])
    importance = _fusion_importance(x, b)
    threshold = _fusion_threshold(importance, generator)
    mask = (importance >= threshold).float()
    return b + (x - b) * mask


def _fusion_importance(x: Tensor, b: Tensor) -> Tensor:
    return (x - b).abs() * _fusion_kl(x, b)


def _fusion_kl(x: Tensor, b: Tensor, work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) per row (along the last dim), keepdim; `work`: two float32
    buffers of x's shape for the softmaxes (else fresh ones)."""
    eps = 1e-8
    # in place where the formula makes a new tensor (softmax(x) + eps, p / q, log, p * ...): the same operations
    # on the same values, so the same bits, without four fresh temporaries per call (torch.softmax's out= is
    # F.softmax's kernel: the same bits)
    if work is None:
        p, q = torch.nn.functional.softmax(x, dim=-1), torch.nn.functional.softmax(b, dim=-1)
    else:
        p, q = torch.softmax(x, -1, out=work[0]), torch.softmax(b, -1, out=work[1])
    p, q = p.add_(eps), q.add_(eps)
    return torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True)


def _fusion_threshold(importance: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    return _fusion_quantile_threshold(torch.sort(flat).values)


def order_statistics(x: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """torch.sort(x).values[r] for each r of `ranks`, of a flat float32 tensor, without sorting it: the float bits
    made into int32 keys that order as the floats do (negative ones' magnitude bits flipped), a histogram of
    their upper 16 bits, then the k-th key inside the bin that holds each rank (kthvalue: linear time). 1M
    values: ~5 ms where torch.sort takes 100. Equal values are equal whatever their order; +0.0 and -0.0, which
    torch leaves in either order, count -0.0 first. With NaN (which torch puts last, whatever its sign bit)
    torch sorts it."""
    if bool(x.isnan().any()):
        ordered = torch.sort(x).values
        return [ordered[r] for r in ranks]
    from composer import native

    found = native.order_statistics(x, ranks)  # the same values in one histogram pass and a quickselect
    if found is not None:
        return found
    bits = x.contiguous().view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    high = (keys >> 16) + 32768
    cum = torch.cumsum(torch.bincount(high, minlength=1 << 16), 0)
    out = []
    for r in ranks:
        at = int(torch.searchsorted(cum, r, right=True))
        below = int(cum[at - 1]) if at else 0
        key = torch.kthvalue(keys[high == at], r - below + 1).values
        out.append((key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32))
    return out


def _fusion_quantile_threshold(ordered: Tensor) -> Tensor:
    """median + 1.5 IQR of the sorted importances, taken index-wise."""
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def _fusion_threshold_unsorted(importances: Tensor) -> Tensor:
    """_fusion_quantile_threshold of the importances in any order: the same three order statistics, unsorted."""
    at = (torch.tensor([0.25, 0.5, 0.75]) * (importances.numel() - 1)).long().tolist()
    q1, median, q3 = order_statistics(importances, at)
    return median + 1.5 * (q3 - q1)


def _fusion_width(job: MergeJob) -> int:
    """The length of a row: the last dim (a 1-D tensor is one row)."""
    return job.shape[-1] if job.shape else 1


def _fusion_row_steps(job: MergeJob, a: int, b: int, elements: int) -> list[tuple[int, int]]:
    """Elements [a, b) (whole rows) in blocks of whole rows, about `elements` each, and never a lone row when there
    are several: torch splits the reduction of a single long row (>= 32K elements) over its threads, which rounds
    its KL differently from the whole tensor's, whose rows are each reduced by one thread."""
    width = _fusion_width(job)
    per = max(2, elements // width)
    steps = [[r, min(b // width, r + per)] for r in range(a // width, b // width, per)]
    if len(steps) > 1 and steps[-1][1] - steps[-1][0] == 1:
        last = steps.pop()
        steps[-1][1] = last[1]
    return [(r0 * width, r1 * width) for r0, r1 in steps]


# Elements of whole rows per KL computation in the statistics pass: a dozen torch calls each, so 2**18 spent ~5% of
# a 1.1B merge's time on calls (8.5 -> 8.1 s warm at 2**20, the same bytes: each row's softmax and sum are computed
# alone whatever the rows beside it); 2**20 makes ~20 MB of float32 temporaries per pass thread.
FUSION_PIECE = 1 << 20


def _fusion_prepare(job: MergeJob) -> tuple[int, Tensor, Tensor]:
    """(row width, the KL of every row, the threshold) from one pass over blocks of whole rows (each computed in
    pieces of whole rows, as sce's: see _pieces). The threshold's importances are all of them up to
    QUANTILE_SAMPLE elements, else those at QUANTILE_SAMPLE positions drawn from job.generator() as the formula
    draws them; their order does not matter, as they are sorted."""
    if len(job.inputs) != 1:
        raise ValueError(f"arcee_fusion merges exactly one model into the base: got {len(job.inputs)} besides the base")
    from composer import native

    width, other = _fusion_width(job), job.inputs[0]
    sample = None
    if job.numel > QUANTILE_SAMPLE:
        sample = torch.randint(job.numel, (QUANTILE_SAMPLE,), generator=job.generator())
        ordered = native.sort_positions(sample, job.numel)  # int32, without torch.sort's indices
        sample = ordered if ordered is not None else (
            sample.to(torch.int32).sort().values if job.numel < 2**31 else sample.sort().values).long()

    def piece(a: int, b: int) -> tuple[Tensor, Tensor]:
        # the four float32 temporaries (inputs, softmaxes) in the pass thread's own buffers where a piece fits
        # (a lone long row may not): fresh 4 MB ones per piece cost page faults, each page zeroed by the kernel
        # (~12% of a cold 1.1B merge's CPU time)
        work = scratch("fusion", 4, b - a).unbind() if b - a <= 2 * FUSION_PIECE else (None,) * 4
        base = job.read_base(a, b, work[0]).reshape(-1, width)
        x = job.read(other, a, b, work[1]).reshape(-1, width)
        kl = _fusion_kl(x, base, None if work[2] is None else (work[2].view(x.shape), work[3].view(x.shape)))
        if sample is None:
            return kl.reshape(-1), ((x - base).abs() * kl).reshape(-1)
        # the sampled elements only: the same operations on each (|x - base| times its row's KL)
        lo, hi = torch.searchsorted(sample, torch.tensor([a, b], dtype=sample.dtype)).tolist()
        picked = native.fusion_picked(base.reshape(-1), x.reshape(-1), kl.reshape(-1), width, sample[lo:hi], a)
        if picked is not None:  # the same bits in one pass
            return kl.reshape(-1), picked
        at = sample[lo:hi].long() - a
        picked = x.reshape(-1)[at].sub_(base.reshape(-1)[at]).abs_()
        return kl.reshape(-1), picked.mul_(kl.reshape(-1)[at // width])

    def rows(a: int, b: int) -> tuple[Tensor, Tensor]:
        parts = [piece(s, e) for s, e in _fusion_row_steps(job, a, b, FUSION_PIECE)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    parts = list(job.each(rows, _fusion_row_steps(job, 0, job.numel, job.block)))
    kl = torch.cat([part[0] for part in parts])
    threshold = _fusion_threshold_unsorted(torch.cat([part[1] for part in parts]))
    return width, kl, threshold


def _fusion_blend(job: MergeJob, stats: tuple[int, Tensor, Tensor], a: int, b: int) -> Tensor:
    """Any block: each element's importance from its row's KL, against the tensor's threshold."""
    from composer import native

    width, kl, threshold = stats
    base, (x,) = job.read_raw_all(a, b)
    first, last = a // width, (b - 1) // width + 1
    merged = native.fusion_blend(base, x, kl[first:last], a - first * width, width, threshold)
    if merged is not None:  # the same bits in one pass
        return merged
    base, x = base.float(), x.float()
    row_kl = kl[first:last].reshape(-1, 1).expand(-1, width).reshape(-1)[a - first * width: b - first * width]
    mask = (((x - base).abs() * row_kl) >= threshold).float()
    return base + (x - base) * mask


ARCEE_STREAMING = Streaming("row statistics", _fusion_blend, _fusion_prepare)


# ------------------------------------------------------------------------------------------------------- RAM


def ram(base: Tensor, tensors: Sequence[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """RAM: a task-vector element changed by one model only is kept whole; one changed by several is averaged
    over those that changed it.

    Paper: https://arxiv.org/abs/2601.13572 (the reference mergekit names; its title there: Reinforced Agent Merging).
    Formula, with d_i = x_i - base: nz_i = |d_i| > epsilon (strictly), c = sum_i nz_i per element;
      merged = base + sum_i(nz_i d_i [c == 1] + nz_i d_i [c > 1] / max(c, 1)).
    Elements no model changes by more than epsilon keep the base's value (deltas at or below epsilon are dropped,
    even where only one model has them).
    Parameters (mergekit's, shared): epsilon (1e-5; >= 0, the |delta| a model must exceed to count as changing an
    element). No non-base tensors: returns base. Same as mergekit in float32.
    """
    b, deltas, nonzero, counts, overlap, unique = _ram_parts(base, tensors, epsilon)
    if deltas is None:
        return b
    # nz_i d_i [c == 1] + nz_i d_i [c > 1] / max(c, 1) is nz_i d_i / max(c, 1): the same float32 values (where
    # c == 1 the division is exact; where c == 0 every nz_i d_i is 0), in two operations per model instead of five
    merged = deltas.mul_(nonzero).div_(counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


def ramplus_tl(
    base: Tensor, tensors: Sequence[Tensor], *, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2
) -> Tensor:
    """RAM+ (tensor-local): RAM with each model's unique deltas amplified by how much of its change is shared.

    Paper: https://arxiv.org/abs/2601.13572 (as ram); "tensor-local": the statistics are taken per tensor.
    Formula, as ram, with per model i over the whole tensor: S_i = #elements with nz_i and c > 1, U_i = #elements
    with nz_i and c == 1, rho_i = S_i / max(U_i, epsilon) (float32), lambda_i = 1 + r * clamp(rho_i, 0, alpha);
      merged = base + sum_i(nz_i d_i [c == 1] lambda_i + nz_i d_i [c > 1] / max(c, 1)).
    (U_i is floored at epsilon, so a model with no unique elements gets lambda_i = 1 + r * alpha when S_i > 0; it
    has nothing for lambda_i to scale.) lambda_i lies in [1, 1 + r * alpha] for r, alpha >= 0.
    Parameters (mergekit's, all shared): epsilon (1e-5; >= 0; the delta threshold and the floor of U_i), r (0.1;
    the amplification rate), alpha (0.2; the cap on rho; with alpha < 0 the clamp's max wins and lambda_i =
    1 + r * alpha). No non-base tensors: returns base. Same as mergekit in float32.
    """
    b, deltas, nonzero, counts, overlap, unique = _ram_parts(base, tensors, epsilon)
    if deltas is None:
        return b
    shared_counts = (nonzero * overlap).sum(dim=1, dtype=torch.int64)
    unique_counts = (nonzero * unique).sum(dim=1, dtype=torch.int64)
    lambda_ = _ramplus_lambda(shared_counts, unique_counts, epsilon, r, alpha)
    return _ramplus_merge(b, deltas, nonzero, counts, overlap, unique, lambda_)


def _ramplus_lambda(shared_counts: Tensor, unique_counts: Tensor, epsilon: float, r: float, alpha: float) -> Tensor:
    """lambda_i = 1 + r * clamp(S_i / max(U_i, epsilon), 0, alpha), from the integer counts S and U [n]."""
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def _ramplus_merge(b: Tensor, deltas: Tensor, nonzero: Tensor, counts: Tensor, overlap: Tensor, unique: Tensor,
                   lambda_: Tensor) -> Tensor:
    """RAM+'s elementwise step, given the per-model lambdas."""
    # nz_i d_i [c == 1] lambda_i + nz_i d_i [c > 1] / max(c, 1) as (nz_i d_i / max(c, 1)) ([c == 1] lambda_i +
    # [c > 1]): the same float32 values (where c == 1 the division is exact, and one of the two terms is 0), in
    # three operations per model instead of five
    scale = unique * lambda_.unsqueeze(-1) + overlap
    merged = (deltas.mul_(nonzero).div_(counts.clamp(min=1)).mul_(scale)).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


def _ramplus_prepare(job: MergeJob) -> Tensor | None:
    """The lambdas, from the counts S_i and U_i summed over blocks (int64: exact); None: no models but the base."""
    if not job.inputs:
        return None
    s = job.shared

    def counts(a: int, b: int) -> Tensor:
        from composer import native

        total = 0
        for start, stop in _pieces(job, a, b):
            base, xs = job.read_raw_all(start, stop)
            native_counts = torch.zeros((len(xs), 2), dtype=torch.int64)  # (changed, alone) per model
            if native.ram(base, xs, s["epsilon"], counts=native_counts, merge=False):  # the same integers
                changed, alone = native_counts.t()
            else:
                _, _, nonzero, _, overlap, unique = _ram_parts(base, xs, s["epsilon"])  # converts to float32
                # S_i + U_i = sum nz_i; float32 sums of a piece's 0/1 values (< 2**24 of them) are exact
                changed, alone = nonzero.sum(dim=1), (nonzero * unique).sum(dim=1)
            total = total + torch.stack([changed - alone, alone]).to(torch.int64)
        return total

    total = sum(job.each(counts, job.steps()))
    return _ramplus_lambda(total[0], total[1], s["epsilon"], s["r"], s["alpha"])


def _ramplus_blend(job: MergeJob, lambda_: Tensor | None, a: int, b: int) -> Tensor:
    from composer import native

    base, xs = job.read_raw_all(a, b)
    lambdas = None if lambda_ is None else lambda_.tolist()  # float32 values, exactly
    merged = native.ram(base, xs, job.shared["epsilon"], lambdas) if xs else None  # the same bits in one pass
    if merged is not None:
        return merged
    base, deltas, nonzero, counts, overlap, unique = _ram_parts(base, xs, job.shared["epsilon"])
    if deltas is None:
        return base
    return _ramplus_merge(base, deltas, nonzero, counts, overlap, unique, lambda_)


def _ram_blend(job: MergeJob, stats: None, a: int, b: int) -> Tensor:
    """Any block of ram: the formula, in one native pass where the kernels are built (the same bits)."""
    from composer import native

    base, xs = job.read_raw_all(a, b)
    merged = native.ram(base, xs, job.shared["epsilon"]) if xs else None
    return merged if merged is not None else ram(base, xs, epsilon=job.shared["epsilon"])  # converts to float32


RAMPLUS_STREAMING = Streaming("statistics", _ramplus_blend, _ramplus_prepare)
RAM_STREAMING = Streaming("elementwise", _ram_blend)


def _ram_parts(base: Tensor, tensors: Sequence[Tensor], epsilon: float):
    """The flattened task vectors (models x elements), which exceed epsilon, how many models do per element, and
    where that is more than one / exactly one (mergekit's _prepare_ram_vectors). deltas None: no other models."""
    xs = _float32([base, *tensors])
    b, xs = xs[0], xs[1:]
    if not xs:
        return b, None, None, None, None, None
    deltas = torch.stack([x - b for x in xs], dim=0).view(len(xs), -1)
    # float 0/1 masks made with arithmetic (torch's comparisons and bool tensors cost ~5x as much here), each equal
    # to mergekit's bool one where it multiplies: |d| > epsilon, counts > 1, counts == 1 (counts <= n: exact)
    nonzero = (deltas.abs() - epsilon).sign_().clamp_(min=0)
    counts = nonzero.sum(dim=0, keepdim=True)
    step = (counts - 1).sign_()
    return b, deltas, nonzero, counts, step.clamp(min=0), 1 - step.abs()
