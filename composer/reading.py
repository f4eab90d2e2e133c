"""Reading the inputs: source files opened once (a descriptor for byte copies, a map for computed tensors),
read-ahead hints for the next chunk, and the first inputs read while torch imports."""
from __future__ import annotations

import gc
import importlib
import mmap
import os
import sys
import threading
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping

from composer.dtypes import ITEMSIZE, torch_dtype
from composer.errors import CorruptFileError
from composer.filecheck import file_stamp
from composer.sources import TensorInfo
from composer.tensorplan import Plan, merge_mode
from composer.vocab import AlignedRows
from composer.writer import ShardPlan

# POSIX_FADV_WILLNEED reads at most max(read-ahead, the device's optimal I/O size) per call (mm/readahead.c,
# force_page_cache_ra): a whole 131 MB tensor asked for at once got its first 8 MB read and nothing more.
WILLNEED_PIECE = 2 * 2**20
# Input bytes read while torch imports (2-4 s from a cold cache, mostly one busy core and an idle disk): the first
# chunks' inputs, into the page cache (not our memory). Cold 1.1B slerp: median 14.1 -> 13.1 s over 6 runs each.
EARLY_READ_BYTES = 2 * 10**9
# ... and where the stager reads the merged tensors' inputs (composer.staging), only as much as its buffer holds:
# each byte the early read takes is one the stager does not stage, read through the page cache and then faulted
# in through the map (on this VM 2-3x the CPU time of O_DIRECT). Measured with budgets of 0, 150, 300 and 600 MB
# against 2 GB: a cold 1.1B arcee_fusion ran 8.2-8.7 s with 2 GB (5.2-5.6 s of system time), 5.4-7.0 s with 150-600
# MB (1-2.3 s), 6.1-6.2 s with none; ties 5.1-6.9 s with the smaller budgets, 6.7 s with 2 GB (within its noise);
# linear the same (5.5 s) with any of them.
EARLY_READ_STAGED = 256 * 2**20
EARLY_READ_PIECE = 4 * 2**20  # one request at a time (the disk's largest here, max_sectors_kb)


def plan_stamps(plan: Plan) -> dict[Path, tuple[int, ...]]:
    """The identity of every input file when the plan read its header (composer.sources.file_stamp)."""
    return {f: s for src in plan.sources.values() for f, s in src.stamps.items()}


def _changed(path: Path, when: str) -> CorruptFileError:
    return CorruptFileError(f"{path} changed {when} (its size, times or inode differ from when the plan read it): "
                            "composer does not write a model from two versions of an input; run again once it is "
                            "stable")


def check_unchanged(stamps: Mapping[Path, tuple[int, ...]]) -> None:
    """Refuse, before the output is finished, an input file that was replaced, truncated or written since the
    plan read it (a stat per file: contents are never hashed)."""
    for path, stamp in stamps.items():
        try:
            now = file_stamp(os.stat(path))
        except OSError:
            now = None
        if now != stamp:
            raise _changed(path, "while composing")


class Sources:
    """Open source files once, read-only: a descriptor for byte copies, an mmap for computed tensors. A file whose
    identity differs from `stamps` (what the plan read) is refused when opened."""

    def __init__(self, stamps: Mapping[Path, tuple[int, ...]] | None = None, stager=None) -> None:
        self.stager = stager  # composer.staging.Stager: merged tensors' inputs read ahead into a buffer, or None
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._stamps = stamps or {}

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in its place must not block the run
                if path in self._stamps and file_stamp(os.fstat(fd)) != self._stamps[path]:
                    os.close(fd)
                    raise _changed(path, "since the plan was made")
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[path] = fd
            return self._fds[path]

    def map(self, path: Path) -> mmap.mmap:
        fd = self.fd(path)
        with self._lock:
            if path not in self._maps:
                self._maps[path] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return self._maps[path]

    def tensor(self, info: TensorInfo, start: int = 0, stop: int | None = None, staged: bool = False):
        """Elements [start, stop) of a source tensor, flat, in its dtype: a view of the mapped file (computed, for a
        composer.sources.Derived stand-in such as a LoRA-merged weight), or with `staged` (the merge engine's reads
        of a merged tensor's inputs, and only those) of the stager's buffer where it has read the tensor."""
        import torch

        stop = info.numel if stop is None else stop
        if info.file is None and hasattr(info, "read"):
            return info.read(self, start, stop)
        if staged and self.stager is not None:
            where = self.stager.view(info)
            if where is not None:
                return torch.frombuffer(where[0], dtype=torch_dtype(info.dtype), count=stop - start,
                                        offset=where[1] + start * ITEMSIZE[info.dtype])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns that the read-only mmap is not writable; never written
            return torch.frombuffer(self.map(info.file), dtype=torch_dtype(info.dtype), count=stop - start,
                                    offset=info.offset + start * ITEMSIZE[info.dtype])

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        for m in self._maps.values():
            m.close()
        for fd in self._fds.values():
            os.close(fd)


def read_into(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CorruptFileError(
                f"{info.file}: tensor '{info.name}' ends early: the file was truncated while composing; "
                "restore it and run again"
            )
        done += got


def prefetch(shard: ShardPlan, segs, start: int, end: int, sources: Sources) -> None:
    """Ask the kernel to start reading the inputs of output bytes [start, end) now (POSIX_FADV_WILLNEED returns
    once the reads are queued): the disk then works on the next chunk while this one computes, for computed
    tensors, which read their inputs through mmap page by page. Byte copies need no hint: they read with preadv
    in large requests."""
    for seg_start, seg_end, tensor in segs:
        a, b = max(start, seg_start), min(end, seg_end)
        if a >= b or tensor is None or not tensor.is_computed:
            continue
        first, last = (a - seg_start) // ITEMSIZE[tensor.dtype], -(-(b - seg_start) // ITEMSIZE[tensor.dtype])
        for info in tensor.inputs:
            if isinstance(info, AlignedRows) or info.file is None:
                continue
            if sources.stager is not None and sources.stager.planned(info):  # read by the stager, not the kernel
                continue
            if tensor.is_merge and merge_mode(tensor) != "elementwise":  # read whole first: hint it all
                lo, hi = info.offset, info.offset + info.nbytes
            else:
                lo, hi = info.offset + first * ITEMSIZE[info.dtype], info.offset + last * ITEMSIZE[info.dtype]
            fd = sources.fd(info.file)
            for piece in range(lo, hi, WILLNEED_PIECE):  # Linux reads at most the read-ahead size per call
                os.posix_fadvise(fd, piece, min(hi, piece + WILLNEED_PIECE) - piece, os.POSIX_FADV_WILLNEED)


class _AfterTorchCore:
    """A meta path finder that finds nothing: it calls `start` at the first import after torch's core library
    (torch._C) has loaded, when the rest of torch's import runs Python code and leaves the disk idle."""

    def __init__(self, start: Callable[[], None]) -> None:
        self._start: Callable[[], None] | None = start

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 - the MetaPathFinder signature
        if self._start is not None and "torch._C" in sys.modules:
            start, self._start = self._start, None
            start()
        return None


def read_ahead(plan: Plan, stop: threading.Event, budget: int = EARLY_READ_BYTES, stager=None) -> None:
    """Read the plan's input bytes into the page cache in the order the chunks will need them, `budget` bytes at
    most, until `stop` is set: one EARLY_READ_PIECE request at a time, without the kernel's read-ahead. torch's
    import still reads pages of its libraries and modules meanwhile, and each of those reads waits behind every
    request queued before it: POSIX_FADV_WILLNEED queued hundreds of MB and stalled the import by seconds."""
    scratch = memoryview(bytearray(EARLY_READ_PIECE))
    fds: dict[Path, int] = {}
    try:
        for shard in plan.shards:
            for entry in shard.entries:
                if entry.tensor.op == "zeros":
                    continue
                for info in entry.tensor.inputs:
                    if isinstance(info, AlignedRows) or info.file is None:
                        continue
                    if stager is not None and not stager.claim(info):  # the stager reads it, bypassing the cache
                        continue
                    if info.file not in fds:
                        fds[info.file] = os.open(info.file, os.O_RDONLY | os.O_NONBLOCK)
                        os.posix_fadvise(fds[info.file], 0, 0, os.POSIX_FADV_RANDOM)
                    for piece in range(info.offset, info.offset + info.nbytes, EARLY_READ_PIECE):
                        if stop.is_set() or budget <= 0:
                            return
                        size = min(info.offset + info.nbytes, piece + EARLY_READ_PIECE) - piece
                        if os.preadv(fds[info.file], [scratch[:size]], piece) < size:
                            return  # a truncated file: the chunk that needs it says so
                        budget -= size
    except OSError:
        return  # only a hint: the chunks read for themselves and report what is wrong
    finally:
        for fd in fds.values():
            os.close(fd)


def import_torch(plan: Plan, stack: ExitStack, stager=None) -> None:
    """Import torch (~10^5 objects: no garbage collection meanwhile, which cost ~0.3 s) and read the plan's first
    inputs once its core library is loaded. The read-ahead stops when `stack` closes."""
    if "torch" in sys.modules:
        return
    stop = threading.Event()
    budget = EARLY_READ_BYTES if stager is None else EARLY_READ_STAGED
    reader = threading.Thread(target=read_ahead, args=(plan, stop, budget, stager),
                              name="composer-read-ahead",
                              daemon=True)

    def finish() -> None:
        stop.set()
        if reader.ident is not None:
            reader.join()

    stack.callback(finish)
    hook = _AfterTorchCore(reader.start)
    sys.meta_path.insert(0, hook)
    gc.disable()
    try:
        importlib.import_module("torch")
    finally:
        gc.enable()
        sys.meta_path.remove(hook)
