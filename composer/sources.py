"""Source models: find a model (folder or Hub id), read its config and safetensors headers (never tensor data), validate
both; convert a pickle checkpoint to safetensors with weights_only=True."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from composer.dtypes import ITEMSIZE
from composer.errors import CorruptFileError, SourceError
from composer.filecheck import DuplicateKey, check_inside, is_regular, not_regular, read_small, stamps_of, unique_keys
from composer.writer import safetensors_header

MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Shaped:
    """numel and nbytes of anything with a `shape` and a safetensors `dtype`."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class TensorInfo(Shaped):
    """Where one tensor's bytes live: file, absolute byte offset, dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None
    offset: int


class Derived(Shaped):
    """A tensor computed from others while streaming (vocabulary rows re-indexed, a LoRA adapter merged in): it
    stands in for a TensorInfo (name, dtype, shape), has no bytes of its own (file None), and is read with
    `read(sources, start, stop)`: elements [start, stop), flat, in its dtype; `rows(sources, r0, r1)` gives whole
    rows."""

    file = None
    offset = 0


@dataclass(frozen=True)
class HubOrigin:
    """Where a model came from on the Hub: the id, the revision asked for, the exact commit (None for a local copy
    named by Hub id with --model), the license its card declares, and whether its weights were pickles."""

    repo_id: str
    revision: str | None = None
    commit: str | None = None
    license: Mapping[str, str] = field(default_factory=dict)  # license, license_name, license_link
    pickled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"hub_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "license": dict(self.license) or None, "weights": "pickle" if self.pickled else "safetensors"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HubOrigin:
        return cls(data["hub_id"], data.get("revision"), data.get("commit"), dict(data.get("license") or {}),
                   data.get("weights") == "pickle")


@dataclass(frozen=True)
class SourceModel:
    """A model as composer sees it before reading any weight: a name, a folder, a config, a tensor table, and for
    a Hub model (or an output built from Hub models) where on the Hub it came from."""

    name: str
    path: Path | None
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    files: tuple[Path, ...] = field(default=())
    hub: HubOrigin | None = None
    lineage: tuple[HubOrigin, ...] = ()  # the Hub models an earlier stage's output was built from
    adapted: tuple[str, ...] = ()  # a `model+adapter` source: the tensors its LoRA adapter changes
    # each weight file's identity when its header was read (file_stamp): a run refuses a file that changed since
    stamps: Mapping[Path, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        from composer.architectures import DEPTH_KEYS, depth_key

        config = self.config
        if depth_key(config) is None and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]  # a multimodal model: its text decoder's depth
        key = depth_key(config)
        if key is None:
            raise SourceError(f"model '{self.name}': config.json has no integer layer count "
                              f"({' or '.join(DEPTH_KEYS)})")
        return config[key]

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
        # O_NONBLOCK: a FIFO put in the file's place opens at once (and is refused) instead of waiting for a writer
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
        st = os.fstat(fd)
        what = not_regular(st.st_mode)
        if what:
            os.close(fd)
            raise SourceError(f"{file} is {what}, not a safetensors file: put the file itself there")
        with open(fd, "rb") as fh:
            size = st.st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:  # checked before reading: n comes from the file
                raise CorruptFileError(
                    f"{file}: corrupt safetensors header (declares {n} header bytes, file has {size}; at most "
                    f"{MAX_HEADER} allowed): re-download it"
                )
            raw = fh.read(n)
    except SourceError:
        raise
    except OSError as exc:
        raise SourceError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as dup:
        raise CorruptFileError(f"{file}: corrupt safetensors header (key '{dup}' appears twice): "
                               "re-download it") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
            ok = isinstance(dtype, str) and dtype in ITEMSIZE
            ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            ok = ok and isinstance(begin, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError):  # not a mapping, missing keys, data_offsets not a pair
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
    if is_regular(index):
        try:
            weight_map = json.loads(read_small(index))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            raise CorruptFileError(f"{index}: not a valid safetensors index (no weight_map): re-download it") from None
        shards = list(dict.fromkeys(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            file = folder / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CorruptFileError(f"{index}: names shard '{shard}', a path outside the model folder: an index "
                                       "names files inside its folder; re-download it")
            if not is_regular(file):
                raise SourceError(f"{index}: names shard '{shard}', which is missing from {folder}")
            check_inside(folder, file)
            tensors.update(read_header(file))
        for tensor, shard in weight_map.items():
            found = tensors.get(tensor)
            if found is None or found.file != folder / shard:
                raise CorruptFileError(f"{index}: tensor '{tensor}' is not in its shard '{shard}': re-download it")
        return {t: tensors[t] for t in weight_map}, tuple(folder / s for s in shards)
    single = folder / SINGLE_NAME
    if is_regular(single):
        check_inside(folder, single)
        return read_header(single), (single,)
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        check_inside(folder, others[0])
        return read_header(others[0]), (others[0],)
    if any(folder.glob("pytorch_model*.bin")):
        raise SourceError(f"model '{name}' ({folder}) has only pytorch_model*.bin weights: convert them to safetensors "
                          "(composer reads pickles only from Hub repos, with weights_only=True)")
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
    raise SourceError(f"model '{name}' not found (no folder {candidates[0]}): check the path")


HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?")


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """`org/name` or `org/name@revision` as (repo id, revision), or None when `name` is not written like a Hub id."""
    m = HUB_ID.fullmatch(name)
    if not m or ".." in m.group(1) or m.group(1).endswith("."):
        return None
    return m.group(1), m.group(2)


def read_config(name: str, folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not is_regular(config_file):
        raise SourceError(f"model '{name}' ({folder}) has no config.json")
    try:
        config = json.loads(read_small(config_file))
    except OSError as exc:
        raise SourceError(f"{config_file}: cannot read: {exc.strerror}: check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CorruptFileError(f"{config_file}: not valid JSON") from None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{config_file}: not a JSON object: re-download it")
    return config


def open_model(name: str, folder: Path) -> SourceModel:
    if not os.access(folder, os.R_OK | os.X_OK):
        raise SourceError(f"model '{name}': cannot read its folder {folder} (permission denied): make it readable "
                          "(chmod -R u+rX) or run as a user who can read it")
    config = read_config(name, folder)
    tensors, files = read_weights(folder, name)
    return SourceModel(name=name, path=folder, config=config, tensors=tensors, files=files, stamps=stamps_of(files))


def open_sources(
    names: list[str], search: tuple[Path, ...] = (), overrides: Mapping[str, str] | None = None, *,
    hub: Any = None, headers_only: bool = False,
) -> dict[str, SourceModel]:
    """Each model by name: an override (--model NAME=PATH), else a local folder (from the cwd, then each search
    folder), else a Hub id `org/name[@revision]`, fetched by `hub` (a composer.hub.HubClient, made on first use).
    With `headers_only`, Hub models are read from config.json and the safetensors headers alone (a dry run)."""
    opened = {}
    for n in names:
        if "+" in n and not (overrides and n in overrides):  # model+adapter: a LoRA merged in while streaming
            from composer.lora import apply_adapter, open_adapter, split_reference

            model_name, adapter_name = split_reference(n)
            model = open_sources([model_name], search, overrides, hub=hub, headers_only=headers_only)[model_name]
            opened[n] = apply_adapter(model, open_adapter(adapter_name, search, overrides, hub), n)[0]
            continue
        ref = parse_hub_id(n)
        if ref is not None and not (overrides and n in overrides) and not _local_exists(n, search):
            if hub is None:
                from composer.hub import HubClient

                hub = HubClient()
            opened[n] = hub.open(n, headers_only=headers_only)
            continue
        model = open_model(n, resolve_local(n, search, overrides))
        if ref is not None and overrides and n in overrides:  # the user says this folder is a copy of a Hub model
            model = replace(model, hub=HubOrigin(ref[0], ref[1]))
        opened[n] = model
    return opened


def _local_exists(name: str, search: tuple[Path, ...]) -> bool:
    p = Path(name).expanduser()
    return any(c.is_dir() for c in ([p] if p.is_absolute() else [p, *(base / p for base in search)]))


TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def convert_pickle(src: Path, dest: Path, name: str) -> None:
    """Write the tensors of a PyTorch checkpoint (`pytorch_model*.bin`) to the safetensors file `dest`, tensor by
    tensor. It is loaded with torch.load(weights_only=True, mmap=True): nothing but tensors and plain containers is
    ever unpickled, and the data is paged in from the file as it is written, so memory does not grow with the file."""
    import torch

    try:
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        why = next((ln.strip().rstrip(".") for ln in str(exc).splitlines() if "unsupported" in ln.lower()), None)
        raise SourceError(f"model '{name}': refused to load {src.name}: it holds more than tensors"
                          f"{f' ({why})' if why else ''} and composer unpickles only with weights_only=True; "
                          "use a safetensors copy of the model") from None
    except RuntimeError as exc:
        raise SourceError(f"model '{name}': cannot read {src.name} as a zip-format PyTorch checkpoint "
                          f"({str(exc).splitlines()[0]}): use a safetensors copy of the model") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SourceError(f"model '{name}': {src.name} is not a flat state dict of named tensors")
    specs = []
    for key, t in state.items():
        dtype = TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise SourceError(f"model '{name}': tensor '{key}' in {src.name} has dtype {t.dtype}, not supported")
        specs.append(_Spec(key, dtype, tuple(t.shape), t.numel() * ITEMSIZE[dtype]))
    header, placed = safetensors_header(specs)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            for spec, _ in placed:
                t = state[spec.name]
                if t.numel():
                    fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that would hold `path` (its nearest existing ancestor)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize
