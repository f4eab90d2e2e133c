"""Blocks of a merge's tensors: element ranges of an input read as float32 (rounded through the recipe's dtype),
the output chunk's typed view, grids of whole rows, per-tensor seeds;
what the merge engine reads and writes through."""
from __future__ import annotations

import hashlib

from composer.dtypes import ITEMSIZE, torch_dtype
from composer.sources import TensorInfo
from composer.tensorplan import TensorPlan
from composer.vocab import AlignedRows, gather


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: random methods give the same tensor whatever the order chunks run in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def read_block(info: TensorInfo, t: TensorPlan, sources, start: int = 0, stop: int | None = None, out=None):
    """Elements [start, stop) of an input, flat, rounded through the recipe's dtype, as float32 (in `out`, a
    float32 buffer at least that long, when given: big temporaries cost page faults)."""
    import torch

    stop = info.numel if stop is None else stop
    via = torch_dtype(t.via or info.dtype)
    if isinstance(info, AlignedRows):  # rows re-indexed to the output vocabulary, rounded through `via` first
        x = gather(info, sources, start, stop, via)
    else:
        x = sources.tensor(info, start, stop, staged=True)
    if out is not None:
        return out[: stop - start].copy_(x if via == x.dtype else x.to(via))
    return x.to(via).to(torch.float32)


def raw_block(info: TensorInfo, t: TensorPlan, sources, start: int = 0, stop: int | None = None):
    """read_block's elements [start, stop), left as the file's bfloat16 where read_block would only convert them
    to float32 (no rounding through another dtype, no re-indexed rows, no computed stand-in); float32 files' are
    read_block's own result. Anything else: read_block's float32."""
    import torch

    stop = info.numel if stop is None else stop
    own = torch_dtype(info.dtype)
    if not isinstance(info, AlignedRows) and info.file is not None and torch_dtype(t.via or info.dtype) == own and \
            own in (torch.bfloat16, torch.float32):
        return sources.tensor(info, start, stop, staged=True)
    return read_block(info, t, sources, start, stop)


def output_view(t: TensorPlan, view: memoryview, start: int):
    """The chunk's part of a tensor as a typed view, the dtype results are rounded through, and the element
    range [first, last) of the tensor that it holds."""
    import torch

    out = torch.frombuffer(view, dtype=torch_dtype(t.dtype))
    first = start // ITEMSIZE[t.dtype]
    return out, torch_dtype(t.via or t.inputs[0].dtype), first, first + out.numel()
