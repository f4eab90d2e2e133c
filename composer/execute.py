"""Run a Plan: assemble each shard front to back in aligned chunks (header, copied bytes, computed values),
write them with direct I/O, and move the finished folder into place."""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping

from composer.dtypes import ITEMSIZE, torch_dtype
from composer.errors import OutputError
from composer.lock import check_unlocked, locked as destination_lock
from composer.merging import Merged
from composer.outputs import write_metadata
from composer.reading import Sources, check_unchanged, import_torch, plan_stamps, prefetch, read_into
from composer.sources import free_bytes
from composer.staging import make_stager
from composer.tensorplan import CHUNK_BYTES, CHUNK_ELEMENTS, SPARE_CHUNKS, WORKERS, Plan, TensorPlan
from composer.vocab import AlignedRows, gather
from composer.writer import ShardPlan, index_json

PARTIAL = ".composer-partial-"
NONFINITE_SHOWN = 5  # merged tensors named in the NaN/Inf warning
_log = logging.getLogger("composer")
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the device's block size
_ZEROS = memoryview(bytes(2**20))
PREFETCH_CHUNKS = 1  # how far ahead of the chunk being written the kernel is asked to read its inputs


def _zero(view: memoryview) -> None:
    for i in range(0, len(view), len(_ZEROS)):
        view[i: i + len(_ZEROS)] = _ZEROS[: len(view) - i]


def _compute_into(t: TensorPlan, sources: Sources, view: memoryview, first: int) -> None:
    """Output elements [first, first + len(view) / itemsize) of an elementwise op, written straight into `view`.

    src -> (the recipe's dtype) -> float32 op -> (the recipe's dtype) -> output dtype, as mergekit rounds.
    """
    import torch

    info = t.inputs[0]
    src_dt, out_dt = torch_dtype(info.dtype), torch_dtype(t.dtype)
    work_dt = torch_dtype(t.via) if t.via else src_dt
    scale = dict(t.params).get("scale")
    out = torch.frombuffer(view, dtype=out_dt)
    count = out.numel()
    if isinstance(info, AlignedRows):
        src = gather(info, sources, first, first + count, work_dt)
    else:
        src = sources.tensor(info, first, first + count)
    for a in range(0, count, CHUNK_ELEMENTS):
        b = min(count, a + CHUNK_ELEMENTS)
        x = src[a:b].to(work_dt)
        if scale is not None:
            x = (x.to(torch.float32) * scale).to(work_dt)
        out[a:b].copy_(x)


def _segments(shard: ShardPlan) -> list[tuple[int, int, TensorPlan | None]]:
    """The shard file as back-to-back byte ranges: the header (None), then each tensor."""
    return [(0, len(shard.header), None)] + [(e.offset, e.offset + e.tensor.nbytes, e.tensor) for e in shard.entries]


def _fill(buf: memoryview, start: int, end: int, shard: ShardPlan, segs, sources: Sources, merged: Merged) -> None:
    """Assemble output bytes [start, end) of a shard in `buf`: header, copied bytes, zeros, computed values."""
    for seg_start, seg_end, tensor in segs:
        a, b = max(start, seg_start), min(end, seg_end)
        if a >= b:
            continue
        view = buf[a - start: b - start]
        if tensor is None:
            view[:] = shard.header[a:b]
        elif tensor.op == "zeros":
            _zero(view)
        elif tensor.is_merge:
            merged.copy_into(tensor, view, a - seg_start)
        elif tensor.is_byte_copy:
            info = tensor.inputs[0]
            read_into(sources.fd(info.file), view, info.offset + (a - seg_start), info)
        else:
            _compute_into(tensor, sources, view, (a - seg_start) // ITEMSIZE[tensor.dtype])


def _open_output(path: Path) -> tuple[int, bool]:
    """Open a shard for direct writes, which skip the page cache and run ~1.5x faster than buffered ones here;
    fall back to buffered writes where the filesystem refuses O_DIRECT (tmpfs, some network filesystems)."""
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct and not os.environ.get("COMPOSER_NO_DIRECT"):
        try:
            fd = os.open(path, flags | direct, 0o644)
            probe = mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                os.pwrite(fd, probe, 0)
                return fd, True
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                probe.close()
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _write_chunk(job, sources: Sources, merged: Merged, buffers: queue.Queue, writer: ThreadPoolExecutor) -> Future:
    """Fill one chunk of a shard, then hand it to the writer pool: the future of its write."""
    shard, segs, fd, direct, start = job
    end = min(shard.size, start + CHUNK_BYTES)
    if end < shard.size:
        prefetch(shard, segs, end, min(shard.size, end + PREFETCH_CHUNKS * CHUNK_BYTES), sources)
    buf = buffers.get()
    try:
        with memoryview(buf) as view:
            _fill(view, start, end, shard, segs, sources, merged)
            length = end - start
            if direct and length % ALIGN:  # the last chunk: pad to the block size, truncated back afterwards
                pad = -length % ALIGN
                _zero(view[length: length + pad])
                length += pad
        return writer.submit(_flush, fd, buf, length, start, end - start, buffers)
    except BaseException:
        buffers.put(buf)
        raise


def _flush(fd: int, buf, length: int, offset: int, size: int, buffers: queue.Queue) -> int:
    try:
        with memoryview(buf) as view:
            done = 0
            while done < length:
                done += os.pwrite(fd, view[done:length], offset + done)
    finally:
        buffers.put(buf)
    return size


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 16 MiB, so that freed big blocks go back to the system.

    By default glibc raises the threshold after such frees (up to 32 MiB), so the float32 copies of whole tensors
    (and our old 32 MB blocks) were then carved from the heap, where freed memory stays counted as ours: about
    1.5 GB after a 1.1B slerp. Temporaries below it (the merge steps' CHUNK_ELEMENTS, the passes' 1M-element
    blocks: 4 MiB of float32) are reused from the heap without page faults: at a 4 MiB threshold each of those
    was a fresh mmap (model_stock 23 s -> 13 s, nuslerp 16 s -> 9 s on the 1.1B benchmark at 16 MiB). The
    passes that make a dozen temporaries per block (ranked, DARE) read their blocks in 1 MiB pieces, so the pass
    threads' heaps stay small (DARE kept 1.6 GB with whole-block temporaries, 0.74 GB in pieces); 1 MiB made
    slerp 1.5x slower.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD; setting it also turns off the dynamic threshold
    libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD: give the heap's free top back to the system beyond 16 MiB


def _write_weights(plan: Plan, tmp: Path, progress: Callable[[int], None], workers: int,
                   stamps: Mapping[Path, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """Write every shard front to back in aligned chunks, `workers` chunks in flight at once. torch is imported
    only for a plan that computes: byte copies and zeros need none of it (a SOLAR up-scale is spared 1-3 s of
    import and ~0.2 GB of memory)."""
    with ExitStack() as stack:
        stager = make_stager(plan) if plan.computes else None
        sources = Sources(stamps, stager)
        stack.callback(sources.close)
        if plan.computes:
            if stager is not None:
                stager.start()  # while torch imports: the first inputs are in the buffer when the workers start
            import_torch(plan, stack, stager)
            import torch

            from composer import ranked

            _return_freed_memory()
            threads = torch.get_num_threads()
            # Our workers are the parallelism (compose -j N: N threads): torch's own would spin-wait on busy cores.
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, threads)
            ranked.use_workers(workers)
        return _write_shards(plan, tmp, progress, workers, sources)


def _write_shards(plan: Plan, tmp: Path, progress: Callable[[int], None], workers: int,
                  sources: Sources) -> dict[str, tuple[str, ...]]:
    """Write every shard; returns the merged tensors whose values are not all finite (Merged.nonfinite)."""
    with ExitStack() as stack:
        buffers: queue.Queue = queue.Queue()
        chunks = max(1, workers) + SPARE_CHUNKS
        for _ in range(chunks):
            # page-aligned, as O_DIRECT requires; private, so it counts (and is measured) as our anonymous memory
            buf = mmap.mmap(-1, CHUNK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MB pages: 32 first-touch faults per buffer instead of 16384
                buf.madvise(mmap.MADV_HUGEPAGE)
            buffers.put(buf)
        jobs, files = [], []
        for shard in plan.shards:
            fd, direct = _open_output(tmp / shard.file)
            stack.callback(os.close, fd)
            files.append((fd, shard.size))
            segs = _segments(shard)
            jobs += [(shard, segs, fd, direct, start) for start in range(0, shard.size, CHUNK_BYTES)]
        writer = stack.enter_context(ThreadPoolExecutor(chunks, thread_name_prefix="composer-write"))
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=max(1, workers)))
        merged = Merged(sources, plan.seed)
        futures = [pool.submit(_write_chunk, job, sources, merged, buffers, writer) for job in jobs]
        try:
            for f in futures:
                progress(f.result().result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        for fd, size in files:
            os.ftruncate(fd, size)
        return merged.nonfinite


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_empty(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"destination {out} exists and is not a folder: remove it or choose another")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"destination {out} is not empty: pass --overwrite to replace it")


def check_destination(plan: Plan, out: Path, overwrite: bool, *, locked: bool = False) -> None:
    """Refuse, before any work, a destination that is not ours to write (`locked`: this run holds its lock)."""
    out = out.resolve()
    for name, src in plan.sources.items():
        if src.path is None:
            continue
        if _is_within(out, src.path):
            raise OutputError(f"destination {out} is inside source model '{name}' ({src.path}): choose another folder")
        if _is_within(src.path, out):
            raise OutputError(f"source model '{name}' ({src.path}) is inside destination {out}: choose another folder")
    check_empty(out, overwrite)
    if not locked:
        check_unlocked(out)
    needed, free = plan.file_bytes, free_bytes(out)
    if free < needed:
        raise OutputError(
            f"destination {out} needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there: "
            "free some space or choose another disk"
        )


def _clean_stale(out: Path) -> None:
    """Remove partial folders left by killed runs for this destination (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def nonfinite_warning(nonfinite: Mapping[str, tuple[str, ...]], shown: int = NONFINITE_SHOWN) -> str:
    """One line: which merged tensors hold NaN or Inf, and from which inputs (at most `shown` tensors named)."""
    names = sorted(nonfinite)
    parts = [f"{n} (from {', '.join(repr(m) for m in dict.fromkeys(nonfinite[n]))})" if nonfinite[n]
             else f"{n} (finite inputs: the merge overflowed)" for n in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (f"{len(names)} merged tensor{'s hold' if len(names) > 1 else ' holds'} NaN or Inf: {'; '.join(parts)}"
            f"{more}: check those inputs (a corrupt or diverged checkpoint?)")


def _no_space(plan: Plan, out: Path) -> OutputError:
    from composer.report import human_bytes

    return OutputError(f"the disk filled up while writing {out}: the model needs {human_bytes(plan.file_bytes)} and "
                       f"{human_bytes(free_bytes(out.parent))} is free there now; the partial output was removed: "
                       "free some space or choose another disk")


def execute(
    plan: Plan, out: str | Path, *, overwrite: bool = False, progress: Callable[[int], None] | None = None,
    workers: int = WORKERS, warn: Callable[[str], None] | None = None,
) -> Path:
    """Write the planned model to `out`. Nothing appears at `out` unless everything was written. `warn` gets one
    line for merged tensors that hold NaN or Inf (default: the `composer` logger's warning)."""
    out = Path(out).resolve()
    check_destination(plan, out, overwrite)
    if plan.prepare is not None:  # work that must come before the first weight (an MoE's router vectors)
        plan.prepare()
    out.parent.mkdir(parents=True, exist_ok=True)
    with destination_lock(out):
        check_destination(plan, out, overwrite, locked=True)  # again: a run that held the lock may have finished
        _clean_stale(out)
        tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            stamps = plan_stamps(plan)
            nonfinite = _write_weights(plan, tmp, progress or (lambda n: None), workers, stamps)
            check_unchanged(stamps)  # after the last read of every input: a file written meanwhile is refused
            index = index_json(plan.shards)
            write_metadata(plan, tmp, index)
            _move_into_place(tmp, out)
            if nonfinite:
                (warn or _log.warning)(nonfinite_warning(nonfinite))
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(plan, out) from None
            raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.composer-old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
