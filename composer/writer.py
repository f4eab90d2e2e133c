"""The output safetensors layout, fixed before any data is written: shard membership, headers, byte offsets."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from composer.dtypes import ITEMSIZE

METADATA = {"format": "pt"}


class _Tensor(Protocol):
    name: str
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class ShardEntry:
    tensor: Any  # a TensorPlan (or anything with name, dtype, shape, nbytes)
    offset: int  # absolute byte offset of the tensor's data in the shard file


@dataclass(frozen=True)
class ShardPlan:
    file: str
    header: bytes  # the 8-byte length prefix and the padded JSON header
    entries: tuple[ShardEntry, ...]
    size: int  # total file size in bytes


def safetensors_header(tensors: Iterable[_Tensor], metadata: dict[str, str] | None = METADATA) -> tuple[bytes, list]:
    """The exact header `safetensors.torch.save_file` writes, and [(tensor, data offset)] in file order.

    save_file orders tensors by dtype size (largest first) then name, writes compact JSON with
    `__metadata__` first, and pads the JSON with spaces to a multiple of 8 bytes.
    """
    ordered = sorted(tensors, key=lambda t: (-ITEMSIZE[t.dtype], t.name))
    doc: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos, placed = 0, []
    for t in ordered:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        placed.append((t, pos))
        pos += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, placed


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def layout_shards(tensors: Iterable[_Tensor], shard_size: int) -> tuple[ShardPlan, ...]:
    """Group tensors in order into shards of at most `shard_size` bytes (a larger tensor gets a shard alone)."""
    groups: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    groups = [g for g in groups if g]
    shards = []
    for name, group in zip(shard_names(len(groups)), groups):
        header, placed = safetensors_header(group)
        entries = tuple(ShardEntry(t, len(header) + off) for t, off in placed)
        shards.append(ShardPlan(name, header, entries, len(header) + sum(t.nbytes for t in group)))
    return tuple(shards)


def index_json(shards: tuple[ShardPlan, ...]) -> dict[str, Any] | None:
    """`model.safetensors.index.json` for a sharded output (None for a single file)."""
    if len(shards) < 2:
        return None
    weight_map = {e.tensor.name: s.file for s in shards for e in s.entries}
    total = sum(e.tensor.nbytes for s in shards for e in s.entries)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
