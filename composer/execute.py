"""Run a Plan: assemble each shard front to back in aligned chunks (header, copied bytes, computed values),
write them with direct I/O, and move the finished folder into place."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from composer.dtypes import ITEMSIZE
from composer.errors import CorruptFileError, OutputError
from composer.outputs import write_metadata
from composer.plan import CHUNK_BYTES, CHUNK_ELEMENTS, WORKERS, Plan, TensorPlan, merge_mode
from composer.sources import TensorInfo, free_bytes
from composer.vocab import AlignedRows, gather
from composer.writer import ShardPlan, index_json

PARTIAL = ".composer-partial-"
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the device's block size
_ZEROS = memoryview(bytes(2**20))


class _Sources:
    """Open source files once, read-only: a descriptor for byte copies, an mmap for computed tensors."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
                os.posix_fadvise(self._fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return self._fds[path]

    def map(self, path: Path) -> mmap.mmap:
        fd = self.fd(path)
        with self._lock:
            if path not in self._maps:
                self._maps[path] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return self._maps[path]

    def tensor(self, info: TensorInfo, start: int = 0, stop: int | None = None):
        """Elements [start, stop) of a source tensor, flat, in its dtype: a view of the mapped file."""
        import torch

        stop = info.numel if stop is None else stop
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns that the read-only mmap is not writable; never written
            return torch.frombuffer(self.map(info.file), dtype=_torch_dtype(info.dtype), count=stop - start,
                                    offset=info.offset + start * ITEMSIZE[info.dtype])

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        for fd in self._fds.values():
            os.close(fd)


def _torch_dtype(code: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]


def _read_into(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CorruptFileError(
                f"{info.file}: tensor '{info.name}' ends early: the file was truncated while composing; "
                "restore it and run again"
            )
        done += got


def _zero(view: memoryview) -> None:
    for i in range(0, len(view), len(_ZEROS)):
        view[i: i + len(_ZEROS)] = _ZEROS[: len(view) - i]


def _compute_into(t: TensorPlan, sources: _Sources, view: memoryview, first: int) -> None:
    """Output elements [first, first + len(view) / itemsize) of an elementwise op, written straight into `view`.

    src -> (the recipe's dtype) -> float32 op -> (the recipe's dtype) -> output dtype, as mergekit rounds.
    """
    import torch

    info = t.inputs[0]
    src_dt, out_dt = _torch_dtype(info.dtype), _torch_dtype(t.dtype)
    work_dt = _torch_dtype(t.via) if t.via else src_dt
    scale = dict(t.params).get("scale")
    out = torch.frombuffer(view, dtype=out_dt)
    count = out.numel()
    if isinstance(info, AlignedRows):
        src = gather(info, sources.tensor, first, first + count, work_dt)
    else:
        src = sources.tensor(info, first, first + count)
    for a in range(0, count, CHUNK_ELEMENTS):
        b = min(count, a + CHUNK_ELEMENTS)
        x = src[a:b].to(work_dt)
        if scale is not None:
            x = (x.to(torch.float32) * scale).to(work_dt)
        out[a:b].copy_(x)


def _seed(seed: int, name: str) -> int:
    """A per-tensor seed: random methods give the same tensor whatever the order chunks run in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _load(info: TensorInfo, t: TensorPlan, sources: _Sources, start: int = 0, stop: int | None = None, out=None):
    """Elements [start, stop) of an input, flat, rounded through the recipe's dtype, as float32 (in `out`, a
    float32 buffer at least that long, when given: big temporaries cost page faults)."""
    import torch

    stop = info.numel if stop is None else stop
    via = _torch_dtype(t.via or info.dtype)
    if isinstance(info, AlignedRows):  # rows re-indexed to the output vocabulary, rounded through `via` first
        x = gather(info, sources.tensor, start, stop, via)
    else:
        x = sources.tensor(info, start, stop)
    if out is not None:
        return out[: stop - start].copy_(x if via == x.dtype else x.to(via))
    return x.to(via).to(torch.float32)


def _apply(t: TensorPlan, inputs: list, seed: int, coefficients=None):
    """The method on loaded inputs (whole tensors, or one block of an elementwise merge)."""
    import torch

    from composer.methods import METHODS

    spec = METHODS[t.op]
    if coefficients is not None:  # slerp, its statistics already streamed
        other = 1 - t.base
        return coefficients[0] * inputs[t.base] + coefficients[1] * inputs[other]
    keep = [k for k in range(len(inputs)) if k != t.base or spec.per_input_includes_base]
    per_input = {name: [dict(t.input_params[k])[name] for k in keep] for name in spec.per_input}
    generator = torch.Generator().manual_seed(_seed(seed, t.name)) if spec.random else None
    base = inputs[t.base] if t.base is not None and spec.base != "ignored" else None
    return spec.apply([inputs[k] for k in keep], base=base,
                      shared=dict(t.params), per_input=per_input, generator=generator)


class _Merged:
    """Merged tensors, computed block by block where the method allows (slerp after two streamed passes for its
    statistics), else whole, once, and served to the chunks they span until fully served."""

    def __init__(self, sources: _Sources, seed: int) -> None:
        self._sources, self._seed = sources, seed
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}  # name -> [lock, whole bytes or slerp coefficients, bytes to serve]

    def _entry(self, t: TensorPlan) -> list:
        with self._lock:
            return self._entries.setdefault(t.name, [threading.Lock(), None, t.nbytes])

    def _served(self, t: TensorPlan, entry: list, n: int) -> None:
        with entry[0]:
            entry[2] -= n
            done = entry[2] == 0
        if done:
            with self._lock:
                del self._entries[t.name]

    def copy_into(self, t: TensorPlan, view: memoryview, start: int) -> None:
        import torch

        mode, entry = merge_mode(t), self._entry(t)
        work, out_dt = _torch_dtype(t.via or t.inputs[0].dtype), _torch_dtype(t.dtype)
        if mode == "whole":
            with entry[0]:
                if entry[1] is None:
                    result = _apply(t, [_load(i, t, self._sources).reshape(i.shape) for i in t.inputs], self._seed)
                    entry[1] = bytearray(t.nbytes)
                    torch.frombuffer(entry[1], dtype=out_dt).copy_(result.reshape(-1).to(work))
                view[:] = memoryview(entry[1])[start: start + len(view)]
        elif mode == "ranked":
            self._ranked_into(t, entry, view, start)
        elif mode == "random":
            self._random_into(t, entry, view, start)
        else:
            coefficients = None
            if mode == "slerp":
                with entry[0]:
                    if entry[1] is None:
                        from composer import methods
                        from composer.methods import slerp_coefficients

                        base, other = t.inputs[t.base], t.inputs[1 - t.base]
                        size = min(t.numel, methods.SLERP_CHUNK)
                        bufs = torch.empty(size, dtype=torch.float32), torch.empty(size, dtype=torch.float32)
                        entry[1] = slerp_coefficients(
                            lambda s, e: (_load(base, t, self._sources, s, e, bufs[0]).reshape(1, -1),
                                          _load(other, t, self._sources, s, e, bufs[1]).reshape(1, -1)),
                            t.numel, dict(t.params)["t"])
                    coefficients = entry[1]
            out = torch.frombuffer(view, dtype=out_dt)
            first = start // ITEMSIZE[t.dtype]
            for a in range(0, out.numel(), CHUNK_ELEMENTS):
                b = min(out.numel(), a + CHUNK_ELEMENTS)
                inputs = [_load(i, t, self._sources, first + a, first + b) for i in t.inputs]
                out[a:b].copy_(_apply(t, inputs, self._seed, coefficients).reshape(-1).to(work))
        self._served(t, entry, len(view))


    def _ranked_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """A magnitude-pruned merge: which elements each task vector keeps is found once in streamed passes
        (composer.ranked); then each block of the output is elementwise."""
        import torch

        from composer import ranked
        from composer.methods import kept_range, streamed_task_arithmetic

        from composer.methods import METHODS

        spec = METHODS[t.op]
        others = [k for k in range(len(t.inputs)) if k != t.base]
        per_input = {name: [dict(t.input_params[k])[name] for k in others] for name in spec.per_input}
        shared = dict(t.params)

        def deltas(a: int, b: int) -> list:
            base = _load(t.inputs[t.base], t, self._sources, a, b)
            return [_load(t.inputs[k], t, self._sources, a, b) - base for k in others]

        with entry[0]:
            if entry[1] is None:
                gammas = per_input.get("gamma", [None] * len(others)) if t.op != "ties" else [None] * len(others)
                densities = per_input.get("density", [1.0] * len(others))
                rescale = bool({**spec.shared, **shared}["rescale"])
                entry[1] = ranked.select(deltas, t.numel, [kept_range(t.numel, float(d), None if g is None else float(g))
                                                           for d, g in zip(densities, gammas)], rescale)
            keeps = entry[1]
        out = torch.frombuffer(view, dtype=_torch_dtype(t.dtype))
        work = _torch_dtype(t.via or t.inputs[0].dtype)
        first = start // ITEMSIZE[t.dtype]
        last = first + out.numel()
        for a in range(first, last, CHUNK_ELEMENTS):
            b = min(last, a + CHUNK_ELEMENTS)
            base = _load(t.inputs[t.base], t, self._sources, a, b)
            xs = [_load(t.inputs[k], t, self._sources, a, b) for k in others]
            merged = streamed_task_arithmetic(t.op, base, xs, shared, per_input,
                                              lambda i, d: ranked.apply(keeps[i], d, a))
            out[a - first: b - first].copy_(merged.to(work))


    def _random_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """DARE: each task vector's Bernoulli mask is drawn per block of a fixed grid (ranked.BLOCK elements) from
        a generator seeded by (--seed, tensor, model, block), so any chunk can draw its part in any order; the L1
        rescale factors are streamed first."""
        import torch

        from composer import ranked
        from composer.methods import METHODS, streamed_task_arithmetic

        spec = METHODS[t.op]
        others = [k for k in range(len(t.inputs)) if k != t.base]
        per_input = {name: [dict(t.input_params[k])[name] for k in others] for name in spec.per_input}
        shared = dict(t.params)
        densities = [float(d) for d in per_input["density"]]
        rescale = bool({**spec.shared, **shared}["rescale"])

        def masks(a: int, b: int) -> list:
            g = a // ranked.BLOCK
            return [None if d >= 1 else torch.bernoulli(
                torch.full((b - a,), d), generator=torch.Generator().manual_seed(_seed(self._seed, f"{t.name}:{i}:{g}")))
                for i, d in enumerate(densities)]

        def deltas(a: int, b: int) -> list:
            base = _load(t.inputs[t.base], t, self._sources, a, b)
            return [_load(t.inputs[k], t, self._sources, a, b) - base for k in others]

        with entry[0]:
            if entry[1] is None:
                factors = [None] * len(others)
                if rescale and any(d < 1 for d in densities):
                    def norms(a: int, b: int) -> list:
                        return [(d.abs().sum(dtype=torch.float64), (d * m).abs().sum(dtype=torch.float64))
                                if m is not None else None for d, m in zip(deltas(a, b), masks(a, b))]

                    sums = [[0.0, 0.0] for _ in others]
                    for part in ranked.each(norms, ranked.blocks(0, t.numel)):
                        for acc, got in zip(sums, part):
                            if got is not None:
                                acc[0] += float(got[0])
                                acc[1] += float(got[1])
                    for i, (before, after) in enumerate(sums):
                        before, after = torch.tensor(before).float(), torch.tensor(after).float()
                        if densities[i] < 1 and before >= 1e-7 and after >= 1e-7:
                            factors[i] = before / after
                entry[1] = factors
            factors = entry[1]
        out = torch.frombuffer(view, dtype=_torch_dtype(t.dtype))
        work = _torch_dtype(t.via or t.inputs[0].dtype)
        first = start // ITEMSIZE[t.dtype]
        last = first + out.numel()
        for ga in range(first - first % ranked.BLOCK, last, ranked.BLOCK):
            gb = min(t.numel, ga + ranked.BLOCK)
            drawn = masks(ga, gb)
            for a in range(max(ga, first), min(gb, last), CHUNK_ELEMENTS):
                b = min(gb, last, a + CHUNK_ELEMENTS)

                def sparsify(i: int, d, a=a):
                    if drawn[i] is None:
                        return d
                    masked = d * drawn[i][a - ga: a - ga + d.numel()]
                    return masked if factors[i] is None else masked * factors[i]

                base = _load(t.inputs[t.base], t, self._sources, a, b)
                xs = [_load(t.inputs[k], t, self._sources, a, b) for k in others]
                merged = streamed_task_arithmetic(t.op, base, xs, shared, per_input, sparsify)
                out[a - first: b - first].copy_(merged.to(work))


def _segments(shard: ShardPlan) -> list[tuple[int, int, TensorPlan | None]]:
    """The shard file as back-to-back byte ranges: the header (None), then each tensor."""
    return [(0, len(shard.header), None)] + [(e.offset, e.offset + e.tensor.nbytes, e.tensor) for e in shard.entries]


def _fill(buf: memoryview, start: int, end: int, shard: ShardPlan, segs, sources: _Sources, merged: _Merged) -> None:
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
            _read_into(sources.fd(info.file), view, info.offset + (a - seg_start), info)
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


def _prefetch(shard: ShardPlan, segs, start: int, end: int, sources: _Sources) -> None:
    """Ask the kernel to start reading the inputs of output bytes [start, end) now (POSIX_FADV_WILLNEED returns at
    once): the disk then works on the next chunk while this one computes, for computed tensors, which read their
    inputs through mmap page by page. Byte copies need no hint: they read with preadv in large requests."""
    for seg_start, seg_end, tensor in segs:
        a, b = max(start, seg_start), min(end, seg_end)
        if a >= b or tensor is None or tensor.op == "zeros" or tensor.is_byte_copy:
            continue
        first, last = (a - seg_start) // ITEMSIZE[tensor.dtype], -(-(b - seg_start) // ITEMSIZE[tensor.dtype])
        for info in tensor.inputs:
            if isinstance(info, AlignedRows) or info.file is None:
                continue
            if tensor.is_merge and merge_mode(tensor) != "elementwise":  # read whole first: hint it all
                lo, hi = info.offset, info.offset + info.nbytes
            else:
                lo, hi = info.offset + first * ITEMSIZE[info.dtype], info.offset + last * ITEMSIZE[info.dtype]
            os.posix_fadvise(sources.fd(info.file), lo, hi - lo, os.POSIX_FADV_WILLNEED)


def _write_chunk(job, sources: _Sources, merged: _Merged, buffers: queue.Queue) -> int:
    shard, segs, fd, direct, start = job
    end = min(shard.size, start + CHUNK_BYTES)
    if end < shard.size:
        _prefetch(shard, segs, end, min(shard.size, end + CHUNK_BYTES), sources)
    buf = buffers.get()
    try:
        view = memoryview(buf)
        _fill(view, start, end, shard, segs, sources, merged)
        length = end - start
        if direct and length % ALIGN:  # the last chunk: pad to the block size, truncated back afterwards
            pad = -length % ALIGN
            _zero(view[length: length + pad])
            length += pad
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:length], start + done)
        view.release()
    finally:
        buffers.put(buf)
    return end - start


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 16 MiB, so that freed big blocks go back to the system.

    By default glibc raises the threshold after such frees (up to 32 MiB), so the float32 copies of whole tensors
    (and our old 32 MB blocks) were then carved from the heap, where freed memory stays counted as ours: about
    1.5 GB after a 1.1B slerp. Our per-step temporaries (CHUNK_ELEMENTS, ranked.BLOCK: at most 4 MiB of float32)
    stay below it and are reused from the heap without page faults; a lower threshold (1 MiB) made slerp 1.5x
    slower.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; setting it also turns off the dynamic threshold
    libc.mallopt(-1, 4 << 20)  # M_TRIM_THRESHOLD: give the heap's free top back to the system beyond 16 MiB


def _write_weights(plan: Plan, tmp: Path, progress: Callable[[int], None], workers: int) -> None:
    """Write every shard front to back in aligned chunks, `workers` chunks in flight at once."""
    import torch

    _return_freed_memory()
    threads = torch.get_num_threads()
    if workers > 1:  # our workers are the parallelism: torch's own threads would spin-wait on busy cores
        torch.set_num_threads(1)
    try:
        _write_shards(plan, tmp, progress, workers)
    finally:
        torch.set_num_threads(threads)


def _write_shards(plan: Plan, tmp: Path, progress: Callable[[int], None], workers: int) -> None:
    with ExitStack() as stack:
        sources = _Sources()
        stack.callback(sources.close)
        buffers: queue.Queue = queue.Queue()
        for _ in range(max(1, workers)):
            # page-aligned, as O_DIRECT requires; private, so it counts (and is measured) as our anonymous memory
            buffers.put(mmap.mmap(-1, CHUNK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        jobs, files = [], []
        for shard in plan.shards:
            fd, direct = _open_output(tmp / shard.file)
            stack.callback(os.close, fd)
            files.append((fd, shard.size))
            segs = _segments(shard)
            jobs += [(shard, segs, fd, direct, start) for start in range(0, shard.size, CHUNK_BYTES)]
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=max(1, workers)))
        merged = _Merged(sources, plan.seed)
        futures = [pool.submit(_write_chunk, job, sources, merged, buffers) for job in jobs]
        try:
            for f in futures:
                progress(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        for fd, size in files:
            os.ftruncate(fd, size)


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_empty(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"destination {out} exists and is not a folder: remove it or choose another")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"destination {out} is not empty: pass --overwrite to replace it")


def check_destination(plan: Plan, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that is not ours to write."""
    out = out.resolve()
    for name, src in plan.sources.items():
        if src.path is None:
            continue
        if _is_within(out, src.path):
            raise OutputError(f"destination {out} is inside source model '{name}' ({src.path}): choose another folder")
        if _is_within(src.path, out):
            raise OutputError(f"source model '{name}' ({src.path}) is inside destination {out}: choose another folder")
    check_empty(out, overwrite)
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


def execute(
    plan: Plan, out: str | Path, *, overwrite: bool = False, progress: Callable[[int], None] | None = None,
    workers: int = WORKERS,
) -> Path:
    """Write the planned model to `out`. Nothing appears at `out` unless everything was written."""
    out = Path(out).resolve()
    check_destination(plan, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(plan, tmp, progress or (lambda n: None), workers)
        index = index_json(plan.shards)
        write_metadata(plan, tmp, index)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
