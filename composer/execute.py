"""Run a Plan: write each shard's header from the plan, stream every tensor into place, then move into place."""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from composer.errors import OutputError
from composer.outputs import write_metadata
from composer.plan import CHUNK_ELEMENTS, Plan, TensorPlan
from composer.sources import free_bytes
from composer.writer import index_json

COPY_BLOCK = 64 * 1024 * 1024
PARTIAL = ".composer-partial-"


class _Sources:
    """Open source files once, read-only: a descriptor for kernel copies, an mmap for computed tensors."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def map(self, path: Path) -> mmap.mmap:
        fd = self.fd(path)
        with self._lock:
            if path not in self._maps:
                self._maps[path] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return self._maps[path]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        for fd in self._fds.values():
            os.close(fd)


def _copy_bytes(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """Copy n bytes file to file in the kernel (copy_file_range), or through a bounded buffer where it can't."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            if got == 0:
                raise OSError(errno.EIO, "source ended early")
            done += got
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while done < n:
        block = os.pread(src, min(COPY_BLOCK, n - done), src_off + done)
        os.pwrite(dst, block, dst_off + done)
        done += len(block)


def _torch_dtype(code: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]


def _compute(t: TensorPlan, sources: _Sources, dst: int, dst_off: int) -> None:
    """Elementwise ops in chunks of CHUNK_ELEMENTS: src -> (recipe dtype) -> float32 op -> (recipe dtype) -> out."""
    import torch

    info = t.inputs[0]
    src_dt, out_dt = _torch_dtype(info.dtype), _torch_dtype(t.dtype)
    work_dt = _torch_dtype(t.via) if t.via else src_dt
    scale = dict(t.params).get("scale")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that the read-only mmap is not writable; we never write it
        src = torch.frombuffer(sources.map(info.file), dtype=src_dt, count=t.numel, offset=info.offset) if t.numel else None
    out_size = torch.empty((), dtype=out_dt).element_size()
    buf = bytearray(min(t.numel, CHUNK_ELEMENTS) * out_size)
    out = torch.frombuffer(buf, dtype=out_dt) if buf else None
    for start in range(0, t.numel, CHUNK_ELEMENTS):
        stop = min(t.numel, start + CHUNK_ELEMENTS)
        x = src[start:stop].to(work_dt)
        if scale is not None:
            x = (x.to(torch.float32) * scale).to(work_dt)
        out[: stop - start].copy_(x)
        os.pwrite(dst, memoryview(buf)[: (stop - start) * out_size], dst_off + start * out_size)


def _write_tensor(t: TensorPlan, sources: _Sources, dst: int, dst_off: int) -> int:
    if t.op == "zeros":
        pass  # the shard was created at full size, and unwritten ranges of a file read as zero bytes
    elif t.is_byte_copy:
        info = t.inputs[0]
        _copy_bytes(sources.fd(info.file), info.offset, dst, dst_off, t.nbytes)
    else:
        _compute(t, sources, dst, dst_off)
    return t.nbytes


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


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
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"destination {out} exists and is not a folder: remove it or choose another")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"destination {out} is not empty: pass --overwrite to replace it")
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


def _write_weights(plan: Plan, tmp: Path, progress: Callable[[int], None], workers: int) -> None:
    with ExitStack() as stack:
        sources = _Sources()
        stack.callback(sources.close)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=max(1, workers)))
        futures = []
        for shard in plan.shards:
            fd = os.open(tmp / shard.file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            stack.callback(os.close, fd)
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, shard.size)
            futures += [pool.submit(_write_tensor, e.tensor, sources, fd, e.offset) for e in shard.entries]
        try:
            for f in futures:
                progress(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def execute(
    plan: Plan, out: str | Path, *, overwrite: bool = False, progress: Callable[[int], None] | None = None,
    workers: int = 2,
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
