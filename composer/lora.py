"""LoRA sources: `model+adapter` wherever a recipe names a model, as mergekit 0.1.5 reads it (mergekit/common.py
ModelReference: one '+' joins a model and a PEFT LoRA adapter, each a local folder or a Hub id with an optional
`@revision`).

mergekit merges the adapter into the model with peft (`PeftModel.from_pretrained(...).merge_and_unload()`) and
saves a merged copy; composer reads the adapter's `adapter_config.json` and the headers of
`adapter_model.safetensors` at plan time and merges each adapted tensor while streaming, row block by row block, as
peft computes it: the LoRA delta `(B @ A) * scaling` in float32 (scaling = lora_alpha / r, or lora_alpha / sqrt(r)
with `use_rslora`; `rank_pattern` and `alpha_pattern` per module, matched as peft matches them), transposed for
embeddings and `fan_in_fan_out` layers, added to the weight in float32 and rounded once to the weight's dtype.
Tensors the adapter saves whole (`modules_to_save`, and the `base_layer` weights peft saves with an adapted
embedding) replace the model's, as they do when peft loads the adapter.

Refused by name, at plan time: DoRA (`use_dora`), LoRA biases (`lora_bias`), other PEFT methods, adapters whose
modules the model lacks or whose shapes do not fit it, a rank in the file that is not the config's, and a pickled
`adapter_model.bin` that does not load with `weights_only=True`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from composer.errors import PlanError, SourceError
from composer.sources import Derived, HubOrigin, SourceModel, TensorInfo, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
# adapter_config.json keys that change what a merged weight is, and that composer does not implement
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
               "layer_replication": "layer_replication", "target_parameters": "target_parameters",
               "trainable_token_indices": "trainable_token_indices", "use_qalora": "QA-LoRA (use_qalora)",
               "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)"}


def split_reference(name: str) -> tuple[str, str | None]:
    """`model+adapter` as (model, adapter); a name without '+' as (name, None)."""
    model, plus, adapter = name.partition("+")
    return (model, adapter) if plus else (name, None)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as a plan sees it: where it is, its config, its tensor table."""

    name: str
    path: Path
    config: Mapping[str, Any]
    tensors: Mapping[str, Any]  # name -> TensorInfo (safetensors) or a torch tensor (a weights_only pickle)
    files: tuple[Path, ...] = ()
    hub: HubOrigin | None = None


def read_adapter(name: str, folder: Path, hub: HubOrigin | None = None) -> Adapter:
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise SourceError(f"adapter '{name}' ({folder}) has no {CONFIG_FILE}: it is not a PEFT adapter folder "
                          "(save it with peft's save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        raise SourceError(f"{config_file}: not a JSON object: re-download the adapter") from None
    if (folder / WEIGHTS_FILE).is_file():
        return Adapter(name, folder, config, read_header(folder / WEIGHTS_FILE), (config_file, folder / WEIGHTS_FILE), hub)
    if (folder / PICKLE_FILE).is_file():
        return Adapter(name, folder, config, _load_pickle(name, folder / PICKLE_FILE), (config_file, folder / PICKLE_FILE),
                       hub)
    raise SourceError(f"adapter '{name}' ({folder}) has no {WEIGHTS_FILE} (or {PICKLE_FILE})")


def open_adapter(name: str, search: tuple[Path, ...] = (), overrides: Mapping[str, str] | None = None,
                 hub: Any = None) -> Adapter:
    """An adapter by reference: an override (--model NAME=PATH), a local folder, else a Hub id org/name[@rev]."""
    from composer.sources import _local_exists, parse_hub_id, resolve_local

    if parse_hub_id(name) is not None and not (overrides and name in overrides) and not _local_exists(name, search):
        if hub is None:
            from composer.hub import HubClient

            hub = HubClient()
        folder, origin = hub.open_adapter(name)
        return read_adapter(name, folder, origin)
    try:
        folder = resolve_local(name, search, overrides)
    except SourceError:
        raise SourceError(f"adapter '{name}' not found (no folder {name}, and it is not a Hub id org/name): check "
                          "the path after '+'") from None
    return read_adapter(name, folder)


def _load_pickle(name: str, file: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise SourceError(f"adapter '{name}': refused to load {file.name}: it does not load with weights_only=True "
                          f"({str(exc).splitlines()[0][:120]}); save the adapter as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SourceError(f"adapter '{name}': {file.name} is not a flat state dict of named tensors")
    return state


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True, eq=False)
class LoraWeight(Derived):
    """A model's tensor with a LoRA adapter merged in; stands in for the model's TensorInfo."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    weight: Any  # the tensor the delta is added to: the model's TensorInfo, or the adapter's saved base_layer weight
    lora_a: Any
    lora_b: Any
    scaling: float
    transposed: bool  # embeddings and fan_in_fan_out layers: delta = (B @ A).T
    status = "adapted"  # provenance: a model's tensor with an adapter merged in

    def rows(self, sources, r0: int, r1: int):
        """Rows [r0, r1) of the merged weight, in its dtype."""
        import torch

        from composer.dtypes import torch_dtype

        width = math.prod(self.shape[1:])
        w = _tensor(sources, self.weight).reshape(-1, width)[r0:r1].to(torch.float32)
        a = _tensor(sources, self.lora_a).reshape(self.lora_a.shape).to(torch.float32)
        b = _tensor(sources, self.lora_b).reshape(self.lora_b.shape).to(torch.float32)
        delta = (b @ a[:, r0:r1]).T if self.transposed else b[r0:r1] @ a
        return (w + (delta * self.scaling).reshape(r1 - r0, width)).to(torch_dtype(self.dtype))

    def read(self, sources, start: int, stop: int):
        """Elements [start, stop) of the merged weight, flat, in its dtype."""
        width = math.prod(self.shape[1:])
        r0, r1 = start // width, -(-stop // width)
        return self.rows(sources, r0, r1).reshape(-1)[start - r0 * width: stop - r0 * width]


def _tensor(sources, info):
    return sources.tensor(info) if isinstance(info, TensorInfo) else info


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _dtype(t) -> str:
    if isinstance(t, TensorInfo):
        return t.dtype
    from composer.sources import TORCH_DTYPES

    return TORCH_DTYPES[str(t.dtype).removeprefix("torch.")]


def apply_adapter(model: SourceModel, adapter: Adapter, name: str) -> tuple[SourceModel, list[str]]:
    """`model` with `adapter` merged in, as the SourceModel named `name`, and the names of the tensors it changes."""
    cfg = adapter.config
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise PlanError(f"adapter '{adapter.name}' is a {kind} adapter: composer merges LoRA adapters only "
                        "(merge it with peft's merge_and_unload first)")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise PlanError(f"adapter '{adapter.name}' uses {what}, which composer does not merge: merge it with "
                            "peft's merge_and_unload first, or train a plain LoRA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise PlanError(f"adapter '{adapter.name}': {CONFIG_FILE} has no valid r / lora_alpha")
    fan_in_fan_out, rslora = bool(cfg.get("fan_in_fan_out")), bool(cfg.get("use_rslora"))
    pairs: dict[str, dict[str, Any]] = {}  # module -> {"A": t, "B": t, "embedding": bool}
    whole: dict[str, Any] = {}  # model tensor name -> adapter tensor that replaces it
    for key, t in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise PlanError(f"adapter '{adapter.name}' has tensor '{key}', not under '{PREFIX}': not a PEFT model "
                            "adapter composer can read")
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight|(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", rest)
        if m:
            module, which = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.setdefault(module, {})[which] = t
            pairs[module]["embedding"] = m.group(3) is not None
        elif ".lora_" in rest or "lora_magnitude_vector" in rest:
            raise PlanError(f"adapter '{adapter.name}' has tensor '{key}', which is not a plain LoRA A/B matrix: "
                            "merge it with peft first")
        else:
            whole[rest.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = t
    tensors = dict(model.tensors)
    for target, t in whole.items():
        own = tensors.get(target)
        if own is None:
            raise PlanError(f"adapter '{adapter.name}' saves '{target}', which '{model.name}' does not have: the "
                            "adapter was trained for another model")
        if _shape(t) != own.shape:
            raise PlanError(f"adapter '{adapter.name}' saves '{target}' with shape {list(_shape(t))}, but "
                            f"'{model.name}' has {list(own.shape)}: the adapter was trained for another model")
        tensors[target] = replace(t, name=target) if isinstance(t, TensorInfo) else _InMemory(target, _dtype(t),
                                                                                             own.shape, t)
    for module, p in sorted(pairs.items()):
        target = f"{module}.weight"
        own = tensors.get(target)
        if own is None:
            raise PlanError(f"adapter '{adapter.name}' targets '{module}', which '{model.name}' does not have (no "
                            f"tensor '{target}'): the adapter was trained for another model")
        if "A" not in p or "B" not in p:
            raise PlanError(f"adapter '{adapter.name}' has only half of the LoRA pair of '{module}': re-save it")
        a, b = p["A"], p["B"]
        rank = _pattern_value(cfg.get("rank_pattern"), module, r)
        if len(_shape(a)) != 2 or len(_shape(b)) != 2 or _shape(a)[0] != _shape(b)[1]:
            raise PlanError(f"adapter '{adapter.name}': the LoRA pair of '{module}' has shapes {list(_shape(a))} and "
                            f"{list(_shape(b))}, which do not multiply: re-save the adapter")
        if _shape(a)[0] != rank:
            raise PlanError(f"adapter '{adapter.name}': '{module}' has rank {_shape(a)[0]} in the file but "
                            f"{rank} in {CONFIG_FILE} (r / rank_pattern): the two do not belong together")
        transposed = p["embedding"] or fan_in_fan_out
        delta = (_shape(a)[1], _shape(b)[0]) if transposed else (_shape(b)[0], _shape(a)[1])
        if len(own.shape) != 2 or tuple(own.shape) != delta:
            raise PlanError(f"adapter '{adapter.name}' changes '{target}' by a {list(delta)} matrix, but "
                            f"'{model.name}' has {list(own.shape)}: the adapter was trained for another model")
        a_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        scaling = a_alpha / math.sqrt(rank) if rslora else a_alpha / rank
        base = own.weight if isinstance(own, LoraWeight) else own
        tensors[target] = LoraWeight(own.name, own.dtype, tuple(own.shape), base, _as_info(a, module, "A"),
                                     _as_info(b, module, "B"), scaling, transposed)
    if not pairs and not whole:
        raise PlanError(f"adapter '{adapter.name}' has no LoRA tensors")
    changed = sorted({f"{m}.weight" for m in pairs} | set(whole))
    lineage = (*model.lineage, *([model.hub] if model.hub else []), *([adapter.hub] if adapter.hub else []))
    from composer.filecheck import stamps_of

    merged = replace(model, name=name, tensors=tensors, files=(*model.files, *adapter.files), hub=None,
                     lineage=lineage, adapted=tuple(changed), stamps={**model.stamps, **stamps_of(adapter.files)})
    return merged, changed


def _as_info(t, module: str, which: str):
    if isinstance(t, TensorInfo):
        return t
    return _InMemory(f"{module}.lora_{which}", _dtype(t), _shape(t), t)


@dataclass(frozen=True, eq=False)
class _InMemory(Derived):
    """A tensor of a weights_only pickle adapter, held in memory (adapters are small)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    value: Any

    def read(self, sources, start: int, stop: int):  # noqa: ARG002 - the Derived signature
        return self.value.reshape(-1)[start:stop]

    def rows(self, sources, r0: int, r1: int):  # noqa: ARG002
        return self.value.reshape(self.shape[0], -1)[r0:r1]

    def reshape(self, *shape):
        return self.value.reshape(*shape)


def describe(name: str, changed: list[str]) -> str:
    """The plan note for one LoRA source: which tensors its adapter changes."""
    layers = sorted({int(m.group(1)) for t in changed if (m := re.search(r"\.layers\.(\d+)\.", t))})
    kinds = sorted({re.sub(r".*\.layers\.\d+\.", "", t).removesuffix(".weight") for t in changed if ".layers." in t})
    other = [t for t in changed if ".layers." not in t]
    parts = []
    if kinds:
        parts.append(f"{', '.join(kinds)} in {len(layers)} layer{'s' if len(layers) != 1 else ''}")
    parts += other
    return f"'{name}': the adapter changes {len(changed)} tensors ({'; '.join(parts)}), merged while streaming"
