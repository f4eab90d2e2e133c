"""Magnitude pruning (TIES, Breadcrumbs) streamed: which task-vector elements to keep, found in a few passes over
row blocks instead of sorting whole tensors.

A method keeps the elements at positions [start, end) of a stable descending sort of |delta| (methods.sparsify.kept_range).
That set is: every element strictly between the values at the two ends, plus, for each end value v, the
equal elements whose rank among the elements equal to v (in index order) falls in a range. Finding it:

1. a histogram of the upper 16 bits of |delta|'s float32 pattern (monotone in the value for non-negative floats);
2. a histogram of the lower 16 bits inside the bins holding the two ends: the exact end values and how many
   elements lie below and at each;
3. only where an end cuts through a run of equal values: where in the tensor the kept part of the run starts and
   ends (equal elements are kept in index order, so the kept ones are those between two indices);
4. only with `rescale`: the L1 norm of the kept elements.

Memory is a few float32 blocks of BLOCK elements per input and 0.5 MB of histogram, whatever the tensor size;
the result equals methods.sparsify._magnitude / _magnitude_outliers on the whole tensor, bit for bit (both sum the L1
norms in float64; the blocks' float64 partial sums round to the same float32).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from composer.tensorplan import RANK_BLOCK

WORKERS = 2
BLOCK = RANK_BLOCK  # elements per step of the passes that rank


def blocks(start: int, stop: int) -> list[tuple[int, int]]:
    """Elements [start, stop) in blocks of BLOCK."""
    return [(a, min(stop, a + BLOCK)) for a in range(start, stop, BLOCK)]


@dataclass
class _End:
    """One end of the kept range: its value (as float32 bits) and which of the elements equal to it are kept."""

    bits: int
    ranks: tuple[int, int]  # kept iff rank among equals (index order) in [ranks[0], ranks[1])
    total: int  # elements equal to it
    indices: tuple[int, int] = (0, 0)  # when the run is cut: the kept equal elements lie at indices [i0, i1)

    @property
    def cut(self) -> bool:
        return self.ranks != (0, self.total)


@dataclass
class Keep:
    """Which elements of one task vector are kept, and the L1 rescale factor to apply (None: no rescale)."""

    lo: _End | None  # None: nothing kept
    hi: _End | None
    factor: Tensor | None = None

    def mask(self, magnitudes: Tensor, start: int) -> Tensor:
        """The float32 mask for |delta| of elements [start, start + len)."""
        if self.lo is None:
            return torch.zeros_like(magnitudes)
        bits = magnitudes.view(torch.int32)
        keep = (bits > self.lo.bits) & (bits < self.hi.bits)
        ends = [self.lo] if self.lo.bits == self.hi.bits else [self.lo, self.hi]
        for end in ends:
            equal = bits == end.bits
            if end.cut:
                first, stop = end.indices
                equal[: max(0, first - start)] = False
                equal[max(0, stop - start):] = False
            keep |= equal
        return keep.to(torch.float32)


def each(fn: Callable[[int, int], list], grid: list[tuple[int, int]]):
    """fn over the blocks on WORKERS threads (torch releases the GIL), results in block order: the merge's other
    chunks often wait for this tensor, so its passes use both cores."""
    if len(grid) == 1:
        yield fn(*grid[0])
        return
    pool = _pool()
    futures = [pool.submit(fn, *block) for block in grid]
    try:
        for future in futures:
            yield future.result()
    finally:  # failed or abandoned: no block may still be reading the sources once the caller closes them
        for future in futures:
            future.cancel()
        wait(futures)


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One pool for the whole process: its threads live on, and so do their thread-local work buffers (a pool
    per tensor cost a fresh set of buffers, page faults included, for every tensor: 1.1M faults in a 1.1B slerp)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(WORKERS, thread_name_prefix="composer-pass"))
        return _POOL[0]


def _locate(hist: Tensor, position: int) -> tuple[int, int]:
    """The bin holding the element at `position` of the sorted values, and how many elements lie in lower bins."""
    cum = torch.cumsum(hist, 0)
    index = int(torch.searchsorted(cum, position, right=True))
    return index, int(cum[index - 1]) if index else 0


def select(
    read: Callable[[int, int], Sequence[Tensor]],
    numel: int,
    ranges: Sequence[tuple[int, int] | None],
    rescale: bool,
) -> list[Keep | None]:
    """For each task vector, the Keep of positions `ranges[i]` (None: keep all, nothing to compute).

    `read(a, b)` returns the float32 deltas of elements [a, b) of every task vector (those with range None
    may be anything: they are not looked at)."""
    active = [i for i, r in enumerate(ranges) if r is not None and r[0] < r[1]]
    keeps: list[Keep | None] = [None if r is None else Keep(None, None) for r in ranges]
    if not active:
        return keeps
    grid = blocks(0, numel)

    def upper(a: int, b: int) -> list:
        deltas = read(a, b)
        out = []
        for i in active:
            magnitudes = deltas[i].abs()
            out.append((torch.bincount(magnitudes.view(torch.int32) >> 16, minlength=1 << 16),
                        magnitudes.sum(dtype=torch.float64) if rescale else None))
        return out

    high = {i: torch.zeros(1 << 16, dtype=torch.int64) for i in active}
    l1 = {i: torch.zeros((), dtype=torch.float64) for i in active}
    for part in each(upper, grid):  # pass 1: upper 16 bits
        for i, (hist, norm) in zip(active, part):
            high[i] += hist
            if rescale:
                l1[i] += norm
    # the smallest and the largest kept value, as positions in ascending order
    wanted = {i: [numel - ranges[i][1], numel - 1 - ranges[i][0]] for i in active}
    located = {i: [_locate(high[i], p) for p in wanted[i]] for i in active}
    bins = [(i, hb) for i in active for hb in sorted({hb for hb, _ in located[i]})]

    def lower(a: int, b: int) -> list:
        deltas = read(a, b)
        magnitudes = {i: deltas[i].abs().view(torch.int32) for i in active}
        return [torch.bincount(magnitudes[i][(magnitudes[i] >> 16) == hb] & 0xFFFF, minlength=1 << 16)
                for i, hb in bins]

    low = {key: torch.zeros(1 << 16, dtype=torch.int64) for key in bins}
    for part in each(lower, grid):  # pass 2: lower 16 bits in the bins holding the ends
        for key, hist in zip(bins, part):
            low[key] += hist
    cut: list[_End] = []
    for i in active:
        start, end = ranges[i]
        ends = []
        for p, (hb, below) in zip(wanted[i], located[i]):
            lb, below_in_bin = _locate(low[i, hb], p - below)
            total = int(low[i, hb][lb])
            greater = numel - below - below_in_bin - total  # equal values sit at [greater, greater + total)
            ranks = (max(0, start - greater), min(total, end - greater))
            ends.append(_End((hb << 16) | lb, ranks, total))
        keeps[i] = Keep(*ends)
        cut += [e for e in ends if e.cut]
    if cut:  # pass 3: where the kept elements of each cut run of equal values start and stop
        _find_indices(read, numel, [(i, e) for i in active for e in (keeps[i].lo, keeps[i].hi) if e.cut])
    if rescale:  # pass 4: L1 norm kept; the factor as methods.sparsify._rescaled computes it
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
    """The sparsified delta of elements [start, start + len)."""
    if keep is None:
        return delta
    masked = delta * keep.mask(delta.abs(), start)
    return masked if keep.factor is None else masked * keep.factor
