"""The merge engine: a generic driver over the methods' declared streaming shapes. Per merged tensor it builds the
method's job, runs the method's statistics passes once (composer.methods.method.Streaming.prepare), then blends
the blocks each output chunk spans; a method that declares no streaming is computed whole, once, and served to
the chunks it spans until fully served. It knows the shapes, never a method's name."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from composer.blocks import output_view
from composer.tensorplan import CHUNK_ELEMENTS, RANK_BLOCK, TensorPlan

if TYPE_CHECKING:
    from torch import Tensor


class Merged:
    """Merged tensors, computed block by block after their statistics passes, or whole, once."""

    def __init__(self, sources, seed: int) -> None:
        self._sources, self._seed = sources, seed
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}  # name -> [lock, (job, stream, stats or whole bytes), bytes to serve]
        self.nonfinite: dict[str, tuple[str, ...]] = {}  # merged tensor -> the inputs (model names) holding NaN/Inf

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
            if getattr(self._sources, "stager", None) is not None:  # its inputs' room in the buffer is free
                self._sources.stager.served(t.name)

    def _prepared(self, t: TensorPlan, entry: list):
        """(job, stream, statistics or the whole result's bytes), made once per tensor, under its lock."""
        import torch

        from composer import ranked
        from composer.dtypes import torch_dtype
        from composer.methods import METHODS, MergeJob

        with entry[0]:
            if entry[1] is None:
                job = MergeJob.of(t, METHODS[t.op], self._seed, self._sources, chunk=CHUNK_ELEMENTS,
                                  block=ranked.BLOCK)
                stream = job.stream
                if stream is None:  # whole tensor
                    inputs = [job.read(k).reshape(t.shape) for k in range(len(t.inputs))]
                    result = job.method.compute(job, None if job.base is None else inputs[job.base],
                                                [inputs[k] for k in job.inputs])
                    stats = bytearray(t.nbytes)
                    work = torch_dtype(t.via or t.inputs[0].dtype)
                    torch.frombuffer(stats, dtype=torch_dtype(t.dtype)).copy_(result.reshape(-1).to(work))
                else:
                    stats = stream.prepare(job) if stream.prepare else None
                entry[1] = job, stream, stats
            return entry[1]

    def copy_into(self, t: TensorPlan, view: memoryview, start: int) -> None:
        entry = self._entry(t)
        job, stream, stats = self._prepared(t, entry)
        out, work, first, last = output_view(t, view, start)
        if stream is None:
            view[:] = memoryview(stats)[start: start + len(view)]
        else:
            grid = stream.grid(job)
            def rounded(x: Tensor) -> Tensor:  # through `work` where the output's dtype is another: copy_ rounds
                return x if work == out.dtype else x.to(work)  # as .to() does, with no temporary
            if grid == 1:  # any block: steps of job.chunk elements
                for a in range(first, last, job.chunk):
                    b = min(last, a + job.chunk)
                    out[a - first: b - first].copy_(rounded(stream.blend(job, stats, a, b).reshape(-1)))
            else:  # grid-aligned blocks; one that two chunks share is computed for each
                for ga in range(first - first % grid, last, grid):
                    gb = min(t.numel, ga + grid)
                    block = stream.blend(job, stats, ga, gb).reshape(-1)
                    a, b = max(ga, first), min(gb, last)
                    out[a - first: b - first].copy_(rounded(block[a - ga: b - ga]))
        # A sum is NaN or Inf when any element is (30x faster than isfinite().all(), which makes a bool tensor);
        # it can also overflow, so _flag confirms element by element.
        if t.name not in self.nonfinite and not bool(out.sum().isfinite()):
            self._flag(t, job, out, first, last)
        self._served(t, entry, len(view))

    def _flag(self, t: TensorPlan, job, out, first: int, last: int) -> None:
        """Record a merged tensor whose output elements [first, last) (`out`) hold NaN or Inf, with the inputs
        whose elements there do (none named: the merge itself overflowed)."""
        if bool(out.isfinite().all()):
            return
        bad = tuple(t.models[k] for k in range(len(t.inputs)) if not bool(job.read(k, first, last).isfinite().all()))
        with self._lock:
            self.nonfinite.setdefault(t.name, bad)


def merge_mode(t: TensorPlan) -> str:
    """The name of the streaming shape a merged tensor is computed with ("whole": none)."""
    from composer.methods import METHODS, MergeJob

    stream = MergeJob.of(t, METHODS[t.op]).stream
    return "whole" if stream is None else stream.name


def held_elements(t: TensorPlan) -> int:
    """Elements of each input (float32) a merged tensor's computation holds at once, for the memory estimate."""
    from composer.methods import METHODS, MergeJob

    job = MergeJob.of(t, METHODS[t.op])
    stream = job.stream
    if stream is None:
        return t.numel
    grid = stream.grid(job)
    return min(t.numel, max(CHUNK_ELEMENTS if grid == 1 else grid, RANK_BLOCK if stream.prepare else 0))
