"""Source models: find a model folder, read its config and safetensors headers (never tensor data), validate both."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from composer.dtypes import ITEMSIZE
from composer.errors import CorruptFileError, SourceError

MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class SourceModel:
    """A model as composer sees it before reading any weight: a name, a folder, a config, a tensor table."""

    name: str
    path: Path | None
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    files: tuple[Path, ...] = field(default=())

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers")
        if not isinstance(n, int):
            raise SourceError(f"model '{self.name}': config.json has no integer num_hidden_layers")
        return n

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"model '{self.name}' has no tensor '{name}' ({self._where()})") from None

    def _where(self) -> str:
        return str(self.path) if self.path else "shapes only"


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; raise CorruptFileError naming the file and tensor."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CorruptFileError(
                    f"{file}: corrupt safetensors header (declares {n} header bytes, file has {size}): re-download it"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise SourceError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptFileError(f"{file}: corrupt safetensors header (not JSON): re-download it") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{file}: corrupt safetensors header (not a JSON object): re-download it")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(begin, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptFileError(f"{file}: tensor '{name}' has a malformed header entry: re-download the file")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected or begin < 0:
            raise CorruptFileError(
                f"{file}: tensor '{name}' has bad data_offsets [{begin}, {end}] for {dtype}{list(shape)} "
                f"({expected} bytes): the file is corrupt"
            )
        if end > data_len:
            raise CorruptFileError(
                f"{file}: tensor '{name}' ends at byte {data_start + end} but the file has {size}: "
                "the file is truncated, re-download it"
            )
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, dtype, shape, file, data_start + begin)
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptFileError(f"{file}: tensors '{n0}' and '{n1}' overlap: the file is corrupt")
    return out


def read_weights(folder: Path, name: str) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    """The tensor table of a model folder: `model.safetensors`, or the shards its index names."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CorruptFileError(f"{index}: not a valid safetensors index (no weight_map): re-download it") from None
        shards = list(dict.fromkeys(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            file = folder / shard
            if not file.is_file():
                raise SourceError(f"{index}: names shard '{shard}', which is missing from {folder}")
            tensors.update(read_header(file))
        for tensor, shard in weight_map.items():
            found = tensors.get(tensor)
            if found is None or found.file != folder / shard:
                raise CorruptFileError(f"{index}: tensor '{tensor}' is not in its shard '{shard}': re-download it")
        return {t: tensors[t] for t in weight_map}, tuple(folder / s for s in shards)
    single = folder / SINGLE_NAME
    if single.is_file():
        return read_header(single), (single,)
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return read_header(others[0]), (others[0],)
    if any(folder.glob("pytorch_model*.bin")):
        raise SourceError(f"model '{name}' ({folder}) has only pytorch_model*.bin weights: convert them to safetensors")
    raise SourceError(f"model '{name}' ({folder}) has no {SINGLE_NAME} or {INDEX_NAME}")


def resolve_local(name: str, search: tuple[Path, ...] = (), overrides: Mapping[str, str] | None = None) -> Path:
    """The local folder for a model reference: an override, a path (from the cwd, then each search folder)."""
    if overrides and name in overrides:
        candidates = [Path(overrides[name]).expanduser()]
    else:
        p = Path(name).expanduser()
        candidates = [p] if p.is_absolute() else [p, *(base / p for base in search)]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    hub_like = "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1
    hint = (
        f": it looks like a Hub id; pass --model {name}=/path/to/local/copy (Hub download is not supported yet)"
        if hub_like and not (overrides and name in overrides)
        else ": check the path"
    )
    raise SourceError(f"model '{name}' not found (no folder {candidates[0]}){hint}")


def open_model(name: str, folder: Path) -> SourceModel:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise SourceError(f"model '{name}' ({folder}) has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptFileError(f"{config_file}: not valid JSON") from None
    tensors, files = read_weights(folder, name)
    return SourceModel(name=name, path=folder, config=config, tensors=tensors, files=files)


def open_sources(
    names: list[str], search: tuple[Path, ...] = (), overrides: Mapping[str, str] | None = None
) -> dict[str, SourceModel]:
    return {n: open_model(n, resolve_local(n, search, overrides)) for n in names}


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that would hold `path` (its nearest existing ancestor)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize
