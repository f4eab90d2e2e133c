"""Magnitude pruning (TIES, Breadcrumbs) streamed: which task-vector elements to keep, found in a few passes over
row blocks instead of sorting whole tensors.

A method keeps the elements at positions [start, end) of a stable descending sort of |delta| (methods.sparsify.kept_range).
That set is: every element strictly between the values at the two ends, plus, for each end value v, the
equal elements whose rank among the elements equal to v (in index order) falls in a range. Finding it:

1. a histogram of the upper 16 bits of |delta|'s float32 pattern (monotone in the value for non-negative floats),
   one bincount per piece whose keys also say whether the lower 16 bits are all 0 (an "exact" element);
2. the elements inside the bins holding the two ends, gathered (their positions and lower 16 bits): the exact
   end values, how many elements lie below and at each, and, where an end cuts through a run of equal values,
   where in the tensor the kept part of the run starts and ends (equal elements are kept in index order, so the
   kept ones are those between two indices). When those bins hold more than GATHER elements (a tensor of very
   few distinct values), a histogram of their lower 16 bits instead, and a third pass for the run's ends;
3. only with `rescale`: the L1 norm of the kept elements.

Memory is a few float32 blocks of BLOCK elements per input, 0.5 MB of histogram and at most GATHER gathered
elements (12 bytes each), whatever the tensor size;
the result equals methods.sparsify._magnitude / _magnitude_outliers on the whole tensor, bit for bit (both sum the L1
norms in float64; the blocks' float64 partial sums round to the same float32).
"""
from __future__ import annotations

import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from composer import native
from composer.tensorplan import RANK_BLOCK

WORKERS = 2
BLOCK = RANK_BLOCK  # elements per step of the passes that rank
PIECE = 1 << 18  # elements read at once inside a block: 1 MiB temporaries, which malloc hands out again and again
# (a 4 MiB one is a fresh mmap: page faults at every use)
GATHER = 1 << 22  # most elements of the end bins gathered in pass 2 (12 bytes each); more: histograms, a third pass


def blocks(start: int, stop: int) -> list[tuple[int, int]]:
    """Elements [start, stop) in blocks of BLOCK."""
    return [(a, min(stop, a + BLOCK)) for a in range(start, stop, BLOCK)]


def pieces(start: int, stop: int) -> list[tuple[int, int]]:
    """A block's elements [start, stop) in the steps that a pass reads and computes at once."""
    return [(a, min(stop, a + PIECE)) for a in range(start, stop, PIECE)]


@dataclass
class _End:
    """One end of the kept range: its value (as float32 bits) and which of the elements equal to it are kept."""

    bits: int
    ranks: tuple[int, int]  # kept iff rank among equals (index order) in [ranks[0], ranks[1])
    total: int  # elements equal to it
    indices: tuple[int, int] = (0, 0)  # when the run is cut: the kept equal elements lie at indices [i0, i1)
    top: bool = False  # the tensor's largest value: nothing lies above it

    @property
    def cut(self) -> bool:
        return self.ranks != (0, self.total)

    @property
    def value(self) -> float:
        return struct.unpack("<f", struct.pack("<i", self.bits))[0]

    def run_kept(self, start: int, stop: int) -> bool | None:
        """Whether the equal elements in [start, stop) are all kept (True), all dropped (False), or some of each
        (None: the block holds an end of the kept part of the run)."""
        if not self.cut:
            return True
        first, end = self.indices
        if self.ranks[0] >= self.ranks[1] or stop <= first or start >= end:
            return False
        return True if first <= start and stop <= end else None


@dataclass
class Keep:
    """Which elements of one task vector are kept, and the L1 rescale factor to apply (None: no rescale)."""

    lo: _End | None  # None: nothing kept
    hi: _End | None
    factor: Tensor | None = None

    def steps(self, start: int, stop: int) -> tuple | None:
        """Elements [start, stop) in the common case: no end of a kept run inside them, so the mask is one step
        per end, (lo, kept at lo, hi or None when nothing above lo is dropped, kept at hi); () when nothing is
        kept; None when the block needs the comparisons (an end cuts a run here, or an end is inf or NaN)."""
        if self.lo is None:
            return ()
        unbounded = self.hi.top and not self.hi.cut  # everything above lo is kept: no upper test
        low, high = self.lo.run_kept(start, stop), True if unbounded else self.hi.run_kept(start, stop)
        if (self.lo.bits != self.hi.bits and low is not None and high is not None and self.lo.bits < _INF
                and (unbounded or self.hi.bits < _INF)):
            return self.lo.value, low, None if unbounded else self.hi.value, high
        return None

    def cuts(self, start: int, stop: int) -> list[int]:
        """The indices inside (start, stop) where the kept part of a cut run of equal values starts or ends: split
        there, every part takes steps() (composer.methods.taskvectors._ranked_blend)."""
        if self.lo is None:
            return []
        return [i for end in (self.lo, self.hi) if end.cut for i in end.indices if start < i < stop]

    def mask(self, magnitudes: Tensor, start: int) -> Tensor:
        """The float32 mask for |delta| of elements [start, start + len)."""
        stop = start + magnitudes.numel()
        steps = self.steps(start, stop)
        if steps == ():
            return torch.zeros_like(magnitudes)
        if steps is not None:
            # one step per end (none above the top), in float arithmetic: torch's comparisons and bool casts cost
            # ~5x as much
            lo, low, hi, high = steps
            keep = _step(magnitudes - lo, low)
            if hi is not None:
                keep.mul_(_step(hi - magnitudes, high))
            return keep
        bits = magnitudes.view(torch.int32)
        unbounded = self.hi.top and not self.hi.cut
        keep = bits > self.lo.bits
        if not unbounded:
            keep &= bits < self.hi.bits
        ends = [self.lo] if self.lo.bits == self.hi.bits or unbounded else [self.lo, self.hi]
        for end in ends:
            equal = bits == end.bits
            if end.cut:
                first, stop = end.indices
                equal[: max(0, first - start)] = False
                equal[max(0, stop - start):] = False
            keep |= equal
        return keep.to(torch.float32)


_INF = 0x7F800000  # float32 +inf's bits: an end at inf or NaN takes the comparisons' path


def _step(difference: Tensor, at_zero: bool) -> Tensor:
    """1.0 where `difference` > 0, and where it is 0 when `at_zero`; else 0.0 (a difference of two floats is 0
    only where they are equal)."""
    step = difference.sign_()
    return step.add_(1).clamp_(max=1) if at_zero else step.clamp_(min=0)


def each(fn: Callable[[int, int], list], grid: list[tuple[int, int]]):
    """fn over the blocks on the pool's threads (WORKERS, or compose -j; torch releases the GIL), results in block
    order: the merge's other chunks often wait for this tensor, so its passes use every worker's core."""
    if len(grid) == 1:
        yield fn(*grid[0])
        return
    pool = _pool()
    futures = deque(pool.submit(fn, *block) for block in grid)
    try:
        while futures:
            result = futures[0].result()
            futures.popleft()  # a consumed block's result lives on only as long as the caller keeps it
            yield result
            result = None
    finally:  # failed or abandoned: no block may still be reading the sources once the caller closes them
        for future in futures:
            future.cancel()
        wait(futures)


_POOL: list[tuple[int, ThreadPoolExecutor]] = []  # (its thread count, the pool)
_POOL_LOCK = threading.Lock()
_SIZE = [WORKERS]  # threads of the passes: the writer's worker count (compose -j)


def use_workers(n: int) -> None:
    """Run the passes on `n` threads from now on (execute's `workers`, compose -j): the pool is remade only when
    the count changes, so its threads and their buffers live on across runs of one count."""
    with _POOL_LOCK:
        _SIZE[0] = max(1, n)
        if _POOL and _POOL[0][0] != _SIZE[0]:
            _POOL.pop()[1].shutdown(wait=True)


def _pool() -> ThreadPoolExecutor:
    """One pool for the whole process: its threads live on, and so do their thread-local work buffers (a pool
    per tensor cost a fresh set of buffers, page faults included, for every tensor: 1.1M faults in a 1.1B slerp)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append((_SIZE[0], ThreadPoolExecutor(_SIZE[0], thread_name_prefix="composer-pass")))
        return _POOL[0][1]


def _locate(hist: Tensor, position: int) -> tuple[int, int]:
    """The bin holding the element at `position` of the sorted values, and how many elements lie in lower bins."""
    cum = torch.cumsum(hist, 0)
    index = int(torch.searchsorted(cum, position, right=True))
    return index, int(cum[index - 1]) if index else 0


def select(
    read: Callable[[int, int], Sequence[Tensor]],
    numel: int,
    ranges: Sequence[tuple[int, int] | None] | Callable[[list[int]], Sequence[tuple[int, int] | None]],
    rescale: bool,
    vectors: int = 0,
    raw: Callable[[int, int], tuple[Tensor, Sequence[Tensor]]] | None = None,
    histogram: Callable[[int, int, Tensor], bool] | None = None,
    nth: Callable[[int, int, int, int], int | None] | None = None,
) -> list[Keep | None]:
    """For each task vector, the Keep of positions `ranges[i]` (None: keep all, nothing to compute).

    `read(a, b)` returns the float32 deltas of elements [a, b) of every task vector (those with range None
    may be anything: they are not looked at). `ranges` may instead be a function of how many elements of each of
    the `vectors` vectors are exactly 0 (+0.0 or -0.0), called after the first pass, which counts them: SCE's k
    counts the nonzero variances, which would otherwise take a pass of its own. `raw(a, b)`, where given, returns
    the (base, inputs) whose differences the deltas are (float32, or bfloat16 whose float32 values they are:
    MergeJob.read_raw): pass 1 then takes them to the native kernel, which subtracts and counts in one pass.
    `histogram(a, b, hist)`, where given (one vector), adds pass 1's keys of elements [a, b) of it to `hist` in
    one native pass, or returns False (then `read` is); `nth(a, b, bits, rank)` likewise finds the index of the
    rank-th element of [a, b) of it whose magnitude has these bits (composer.native.nth_equal_delta's answer), or
    returns None."""
    later = ranges if callable(ranges) else None
    if later is not None:
        ranges = [(0, 1)] * vectors  # every vector is read in the first pass
    active = [i for i, r in enumerate(ranges) if r is not None and r[0] < r[1]]
    keeps: list[Keep | None] = [None if r is None else Keep(None, None) for r in ranges]
    if not active:
        return keeps
    grid = blocks(0, numel)

    fused = raw is not None and not rescale and native.library() is not None  # the delta and its key in one pass
    hooked = histogram is not None and not rescale and native.library() is not None

    def upper(a: int, b: int) -> list:
        out = [[None, torch.zeros((), dtype=torch.float64)] for _ in active]
        # the fused kernel makes no temporaries (raw's are views of the mapped files, but for the rare inputs read
        # through another dtype): the whole block in one call per vector
        for pa, pb in [(a, b)] if fused or hooked else pieces(a, b):
            if hooked:
                out[0][0] = torch.zeros(1 << 16, dtype=torch.int64) if out[0][0] is None else out[0][0]
                if histogram(pa, pb, out[0][0]):
                    continue
            base, xs = raw(pa, pb) if fused else (None, None)
            deltas = None if fused else read(pa, pb)
            for acc, i in zip(out, active):
                if acc[0] is None:
                    acc[0] = torch.zeros(1 << 16, dtype=torch.int64)
                if fused and native.hist16_delta(xs[i], base, acc[0]):
                    continue
                delta = xs[i].float() - base.float() if fused else deltas[i]  # raw: maybe bfloat16
                if rescale:
                    acc[1] += delta.abs().sum(dtype=torch.float64)
                if native.hist16(delta, acc[0]):
                    continue
                magnitudes = delta.abs()
                bits = magnitudes.view(torch.int32)
                # the upper 16 bits rounded down plus rounded up: 2 * bin, + 1 where the lower 16 bits are not all
                # 0 (an inexact element of the bin), so one histogram counts both; |x|'s sign bit is 0, so the
                # bins are < 2**15 and the keys < 2**16
                key = (-bits).bitwise_right_shift_(16).neg_().add_(bits >> 16)
                acc[0] += torch.bincount(key, minlength=1 << 16)
        return out

    keyed = {i: torch.zeros(1 << 16, dtype=torch.int64) for i in active}  # the blocks' histograms added up
    per_block: dict[int, list[Tensor]] = {i: [] for i in active}  # each block's exact elements per bin
    l1 = {i: torch.zeros((), dtype=torch.float64) for i in active}
    for part in each(upper, grid):  # pass 1: upper 16 bits, and whether the lower ones are 0
        for i, (hist, norm) in zip(active, part):
            keyed[i] += hist
            per_block[i].append(hist[0::2].to(torch.int32))
            if rescale:
                l1[i] += norm
    high = {i: torch.zeros(1 << 16, dtype=torch.int64) for i in active}
    inexact = {i: torch.zeros(1 << 16, dtype=torch.int64) for i in active}  # elements whose lower bits are not 0
    for i in active:  # key 2 * bin: the bin's exact elements; 2 * bin + 1: its others
        high[i][: 1 << 15] = keyed[i][0::2] + keyed[i][1::2]
        inexact[i][: 1 << 15] = keyed[i][1::2]
    if later is not None:  # bin 0's exact elements have all bits 0: |delta| is +0.0
        ranges = list(later([int(high[i][0] - inexact[i][0]) for i in active]))
        keeps = [None if r is None else Keep(None, None) for r in ranges]
        active = [i for i, r in enumerate(ranges) if r is not None and r[0] < r[1]]
        if not active:
            return keeps
    # the smallest and the largest kept value, as positions in ascending order
    wanted = {i: [numel - ranges[i][1], numel - 1 - ranges[i][0]] for i in active}
    located = {i: [_locate(high[i], p) for p in wanted[i]] for i in active}
    top = {i: int(torch.nonzero(high[i]).max()) for i in active}  # the bin of each task vector's largest value
    # A bin's exact elements (lower bits 0) are its smallest. An end among them, or the largest kept when the range
    # starts at the top (its value is never tested) outside the other end's bin, is known now; pass 2 reads the
    # lower bits of the other ends' bins (bfloat16 inputs give few).
    def known(i: int, k: int) -> bool:
        (hb, below), p = located[i][k], wanted[i][k]
        return p - below < high[i][hb] - inexact[i][hb] or k == 1 and ranges[i][0] == 0 and hb != located[i][0][0]

    bins = sorted({(i, located[i][k][0]) for i in active for k in (0, 1) if not known(i, k)})
    lows: dict = {}
    positions: dict | None = None
    if bins and sum(int(high[i][hb]) for i, hb in bins) <= GATHER:
        lows, positions = _gather(read, grid, active, bins)
    elif bins:
        lows = _low_histograms(read, grid, active, bins)
    cut: list[tuple[int, _End]] = []
    exact_runs: list[tuple[int, _End, list[int]]] = []
    for i in active:
        start, end = ranges[i]
        ends = []
        for k, (p, (hb, below)) in enumerate(zip(wanted[i], located[i])):
            if k == 1 and start == 0 and hb != located[i][0][0]:
                # the largest kept is the largest: all of the top is kept, its exact value is never tested
                ends.append(_End((hb << 16) | 0xFFFF, (0, 1), 1, top=True))
                continue
            if (i, hb) not in lows:  # among the bin's exact elements, all equal to hb << 16
                exact = int(high[i][hb] - inexact[i][hb])
                lb, below_in_bin, total, largest = 0, 0, exact, 0 if exact == high[i][hb] else -1
            else:
                counts = lows[i, hb] if positions is None else torch.bincount(lows[i, hb], minlength=1 << 16)
                lb, below_in_bin = _locate(counts, p - below)
                total, largest = int(counts[lb]), int(torch.nonzero(counts).max())
            greater = numel - below - below_in_bin - total  # equal values sit at [greater, greater + total)
            ranks = (max(0, start - greater), min(total, end - greater))
            e = _End((hb << 16) | lb, ranks, total, top=hb == top[i] and lb == largest)
            if e.cut and ranks[0] < ranks[1]:
                if (i, hb) not in lows:  # the exact elements of bin hb, block by block
                    exact_runs.append((i, e, [int(exact[hb]) for exact in per_block[i]]))
                elif positions is not None:
                    equal = positions[i, hb][lows[i, hb] == lb]  # in index order
                    e.indices = (int(equal[ranks[0]]), int(equal[ranks[1] - 1]) + 1)
                else:
                    cut.append((i, e))
            ends.append(e)
        keeps[i] = Keep(*ends)
    for i, e, counts in exact_runs:  # the run is the whole bin: read only the blocks holding its kept part's ends
        # a kept part that starts at the run's first element or ends at its last needs no index there: no equal
        # element lies before the first or after the last
        find = nth if nth is not None and native.library() is not None else None
        if fused:
            find = (lambda a, b, bits, rank, i=i:
                    (lambda base, xs: native.nth_equal_delta(xs[i], base, bits, rank))(*raw(a, b)))
        e.indices = (0 if e.ranks[0] == 0 else _nth_equal(read, grid, i, e.bits, counts, e.ranks[0], find),
                     numel if e.ranks[1] == e.total else
                     _nth_equal(read, grid, i, e.bits, counts, e.ranks[1] - 1, find) + 1)
    if cut:  # pass 3, only after histograms: where the kept elements of each cut run of equal values lie
        _find_indices(read, numel, cut)
    if rescale:  # the last pass: L1 norm kept; the factor as methods.sparsify._rescaled computes it
        def norms(a: int, b: int) -> list:
            deltas = read(a, b)
            return [(m * keeps[i].mask(m, a)).sum(dtype=torch.float64) for i in active for m in [deltas[i].abs()]]

        kept = {i: torch.zeros((), dtype=torch.float64) for i in active}
        for part in each(norms, grid):
            for i, norm in zip(active, part):
                kept[i] += norm
        for i in active:
            before, after = l1[i].to(torch.float32), kept[i].to(torch.float32)
            if before >= 1e-7 and after >= 1e-7:
                keeps[i].factor = before / after
    return keeps


def _gather(read: Callable[[int, int], Sequence[Tensor]], grid: list[tuple[int, int]], active: list[int],
            bins: list[tuple[int, int]]) -> tuple[dict, dict]:
    """Pass 2: the lower 16 bits and the positions of the elements in each (task vector, upper bin), index order."""
    def gathered(a: int, b: int) -> list:
        found: list[list] = [[] for _ in bins]
        for pa, pb in pieces(a, b):
            deltas = read(pa, pb)
            bits = {i: deltas[i].abs().view(torch.int32) for i in active}
            for got, (i, hb) in zip(found, bins):
                at = torch.nonzero((bits[i] >> 16) == hb).reshape(-1)
                got.append((bits[i][at] & 0xFFFF, at + pa))
        return [(torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])) for got in found]

    parts = list(each(gathered, grid))
    lows = {key: torch.cat([part[k][0] for part in parts]) for k, key in enumerate(bins)}
    positions = {key: torch.cat([part[k][1] for part in parts]) for k, key in enumerate(bins)}
    return lows, positions


def _low_histograms(read: Callable[[int, int], Sequence[Tensor]], grid: list[tuple[int, int]], active: list[int],
                    bins: list[tuple[int, int]]) -> dict:
    """Pass 2 where the end bins hold too many elements to gather: histograms of their lower 16 bits."""
    def lower(a: int, b: int) -> list:
        hists = [torch.zeros(1 << 16, dtype=torch.int64) for _ in bins]
        for pa, pb in pieces(a, b):
            deltas = read(pa, pb)
            magnitudes = {i: deltas[i].abs().view(torch.int32) for i in active}
            for hist, (i, hb) in zip(hists, bins):
                hist += torch.bincount(magnitudes[i][(magnitudes[i] >> 16) == hb] & 0xFFFF, minlength=1 << 16)
        return hists

    low = {key: torch.zeros(1 << 16, dtype=torch.int64) for key in bins}
    for part in each(lower, grid):
        for key, hist in zip(bins, part):
            low[key] += hist
    return low


def _nth_equal(read: Callable[[int, int], Sequence[Tensor]], grid: list[tuple[int, int]], i: int, bits: int,
               counts: list[int], rank: int, find: Callable[[int, int, int, int], int | None] | None = None) -> int:
    """The index of the rank-th element (index order) of task vector i whose |delta| has these bits, given how many
    each block holds: one block read (by a native kernel where `find(a, b, bits, rank)` answers: select's)."""
    seen = 0
    for (a, b), count in zip(grid, counts):
        if rank < seen + count:
            if find is not None:
                at = find(a, b, bits, rank - seen)
                if at is not None:
                    if at < 0:
                        raise AssertionError("rank beyond the block's equal elements")  # counted from the same
                    return a + at
            for pa, pb in pieces(a, b):  # the block's pieces up to the one holding it
                equal = read(pa, pb)[i].abs().view(torch.int32) == bits
                count = int(equal.sum())
                if rank < seen + count:
                    return pa + int(torch.nonzero(equal).reshape(-1)[rank - seen])
                seen += count
            break
        seen += count
    raise AssertionError("rank beyond the run")  # the counts come from the same blocks


def _find_indices(read: Callable[[int, int], Sequence[Tensor]], numel: int, owners: list) -> None:
    """Set end.indices for each (task vector, cut end): the index of its ranks[0]-th equal element and one past
    its (ranks[1] - 1)-th."""
    seen = {id(e): 0 for _, e in owners}
    wanted = {id(e): [e.ranks[0], e.ranks[1] - 1] for _, e in owners}
    found: dict[int, list[int]] = {id(e): [] for _, e in owners}
    for a, b in blocks(0, numel):
        if all(len(found[k]) == 2 for k in found):
            break
        deltas = read(a, b)
        for i, e in owners:
            k = id(e)
            if len(found[k]) == 2:
                continue
            equal = deltas[i].abs().view(torch.int32) == e.bits
            count = int(equal.sum())
            while len(found[k]) < 2 and wanted[k][len(found[k])] < seen[k] + count:
                at = torch.nonzero(equal).reshape(-1)
                found[k].append(a + int(at[wanted[k][len(found[k])] - seen[k]]))
            seen[k] += count
    for _, e in owners:
        e.indices = (found[id(e)][0], found[id(e)][1] + 1)


def apply(keep: Keep | None, delta: Tensor, start: int) -> Tensor:
    """The sparsified delta of elements [start, start + len), in place."""
    if keep is None:
        return delta
    delta.mul_(keep.mask(delta.abs(), start))
    return delta if keep.factor is None else delta.mul_(keep.factor)
