"""Training after block expansion (LLaMA Pro): train only the inserted blocks, as the output's provenance lists them.

A block expansion's output folder holds `composer_provenance.json` (composer.report.provenance): one entry per
output layer with a `status`, "new" for the inserted identity blocks, and every tensor's checkpoint name with its
layer. From it:

- `new_layers(out_dir)`: the new blocks' layer indices (what LLaMA-Factory's `freeze_trainable_layers` with
  `use_llama_pro` and PEFT's `layers_to_transform` select by);
- `trainable_parameters(out_dir)`: the new blocks' tensor names as the checkpoint stores them (for a dense model
  also the names in `model.named_parameters()`; pass `model=` for exactly those of a loaded model);
- `freeze_original(model, out_dir)`: sets `requires_grad` so that only the new blocks' parameters train.

Layers are found in a loaded model by composer's layer-name rule (composer.architectures.LAYER_NAME: a layer
parameter is `<prefix>.<N>.<rest>`, the prefix ending before the first numeric component), matched to the
checkpoint's prefix by its trailing components, so a model loaded as `AutoModel` (`layers.N`) or wrapped by PEFT
(`base_model.model.model.layers.N`) maps as well as `AutoModelForCausalLM` (`model.layers.N`). No torch import here.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer import architectures
from composer.errors import CorruptFileError, PlanError, SourceError
from composer.outputs import PROVENANCE_FILE

FORMAT = "composer-provenance/"


@dataclass(frozen=True)
class Freeze:
    """What `freeze_original` did: the new layer indices, the parameters it left trainable (names as in
    `model.named_parameters()`, in that order) and the element counts trained and frozen."""

    new_layers: list[int]
    trainable: list[str]
    trainable_numel: int
    frozen_numel: int

    @property
    def total_numel(self) -> int:
        return self.trainable_numel + self.frozen_numel


@dataclass(frozen=True)
class _Provenance:
    folder: Path
    layers: list[dict[str, Any]]
    new_layers: list[int]
    tensors: dict[str, dict[str, Any]]
    prefix: tuple[str, ...] | None  # the checkpoint's layer prefix, split on dots (`model.layers`)
    config: dict[str, Any]


def _read(out_dir: str | Path) -> _Provenance:
    folder = Path(out_dir)
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        where = "no such folder" if not folder.is_dir() else f"it has no {PROVENANCE_FILE}"
        raise SourceError(
            f"{folder}: {where}; freezing by provenance needs a folder written by composer (a block_expansion "
            f"recipe's output), which records its new layers in {PROVENANCE_FILE}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not readable JSON ({exc}); re-run the recipe to rewrite it") from exc
    if not (isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT)
            and isinstance(data.get("layers"), list)):
        raise CorruptFileError(f"{path}: not a composer provenance file (no '{FORMAT}N' format with a layer list)")
    layers = data["layers"]
    try:
        new = [int(la["layer"]) for la in layers if la.get("status") == "new"]
        indices = [int(la["layer"]) for la in layers]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(f"{path}: a layer entry lacks its index ({exc})") from exc
    if indices != list(range(len(layers))):
        raise CorruptFileError(f"{path}: layer entries are not numbered 0..{len(layers) - 1} in order")
    tensors = data.get("tensors") if isinstance(data.get("tensors"), dict) else {}
    prefixes = {m.group("prefix") for name, t in tensors.items()
                if isinstance(t, dict) and t.get("layer") is not None and (m := architectures.LAYER_NAME.match(name))}
    if len(prefixes) > 1:
        raise PlanError(f"{path}: layer tensors under several prefixes ({', '.join(sorted(prefixes))}); "
                        f"freezing by provenance handles one decoder stack")
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {}
    return _Provenance(folder, layers, new, tensors, tuple(prefixes.pop().split(".")) if prefixes else None, config)


def _expansion(out_dir: str | Path) -> _Provenance:
    prov = _read(out_dir)
    if not prov.new_layers:
        statuses = sorted({str(la.get("status")) for la in prov.layers})
        raise PlanError(
            f"{prov.folder}: no layer is new (layer statuses: {', '.join(statuses) or 'none'}): this output is not a "
            f"block expansion, so there are no inserted blocks to train; freeze_original applies to the output of "
            f"a `block_expansion:` recipe"
        )
    return prov


def new_layers(out_dir: str | Path) -> list[int]:
    """The indices of the blocks a block expansion inserted, ascending (PlanError: none, not an expansion;
    SourceError: the folder has no composer provenance)."""
    return list(_expansion(out_dir).new_layers)


def _matches(prefix: tuple[str, ...], ckpt: tuple[str, ...] | None) -> bool:
    """Whether a model's layer prefix is the checkpoint's, give or take leading wrapper components."""
    if ckpt is None:
        return True
    n = min(len(prefix), len(ckpt))
    return prefix[len(prefix) - n:] == ckpt[len(ckpt) - n:]


def _layer_of(name: str, ckpt: tuple[str, ...] | None) -> int | None:
    m = architectures.LAYER_NAME.match(name)
    if m is None or not _matches(tuple(m.group("prefix").split(".")), ckpt):
        return None
    return int(m.group("layer"))


def _model_depth(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = getattr(config, "text_config", None) or config  # composite models keep the decoder's config there
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    key = architectures.depth_key(as_dict)
    return as_dict[key] if key else None


def _select(model: Any, prov: _Provenance) -> list[tuple[str, Any, bool]]:
    """(name, parameter, trainable) for every parameter of the model, checked against the provenance."""
    want = len(prov.layers)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if prov.config.get("model_type") and model_type and model_type != prov.config["model_type"]:
        raise PlanError(f"the model is a {model_type!r}, but {prov.folder} holds a {prov.config['model_type']!r}: "
                        f"load the model from {prov.folder}")
    params = list(model.named_parameters())
    found = sorted({layer for name, _ in params if (layer := _layer_of(name, prov.prefix)) is not None})
    depth = _model_depth(model)
    if (depth is not None and depth != want) or found != list(range(want)):
        have = depth if depth is not None else len(found)
        shown = f"{have} layers" + (f" (parameters of {len(found)})" if depth is not None and len(found) != have
                                    else "")
        raise PlanError(
            f"the model has {shown}, but {prov.folder}'s provenance lists {want}: freeze_original needs the model "
            f"loaded from that folder (not its source, nor another stage's output)"
        )
    new = set(prov.new_layers)
    return [(name, p, _layer_of(name, prov.prefix) in new) for name, p in params]


def trainable_parameters(out_dir: str | Path, model: Any = None) -> list[str]:
    """The names of the parameters to train after a block expansion: the new blocks' tensors.

    Without `model`, the checkpoint's tensor names of the new layers, by layer then name (for the dense families
    these are exactly `model.named_parameters()`'s names of a model loaded from `out_dir`; a loader that renames or
    fuses tensors, as transformers 5 does with MoE experts, needs `model`). With `model`, the names in
    `model.named_parameters()` that `freeze_original(model, out_dir)` leaves trainable, in that order; the model is
    not changed. Raises as `freeze_original` does.
    """
    prov = _expansion(out_dir)
    if model is not None:
        return [name for name, _, train in _select(model, prov) if train]
    new = set(prov.new_layers)
    names = [(t["layer"], name) for name, t in prov.tensors.items()
             if isinstance(t, dict) and t.get("layer") in new]
    if not names:
        raise CorruptFileError(f"{prov.folder / PROVENANCE_FILE}: lists no tensors of the new layers "
                               f"{prov.new_layers}; re-run the recipe to rewrite it")
    return [name for _, name in sorted(names)]


def freeze_original(model: Any, out_dir: str | Path) -> Freeze:
    """Make only a block expansion's inserted blocks trainable: `requires_grad` True for every parameter of the
    new layers that `out_dir/composer_provenance.json` lists, False for all others (the original layers, the
    embeddings, the final norm and the head). `model` is the torch module loaded from `out_dir` (e.g.
    AutoModelForCausalLM.from_pretrained(out_dir)), plain or wrapped.

    Raises SourceError if `out_dir` has no provenance, PlanError if no layer is new (not a block expansion) or the
    model's layer count differs from the provenance's (or its model_type from out_dir's config), CorruptFileError if
    the provenance is unreadable. Nothing is changed when it raises. Returns a `Freeze`.
    """
    prov = _expansion(out_dir)
    chosen = _select(model, prov)
    if not any(train for _, _, train in chosen):
        raise PlanError(f"no parameter of {model.__class__.__name__} belongs to the new layers {prov.new_layers}")
    trainable: list[str] = []
    counts = [0, 0]  # frozen, trainable
    seen: set[int] = set()
    for name, param, train in chosen:
        param.requires_grad_(train)
        if train:
            trainable.append(name)
        if id(param) not in seen:
            seen.add(id(param))
            counts[train] += param.numel()
    return Freeze(list(prov.new_layers), trainable, counts[1], counts[0])


def llama_pro_layers(num_layers: int, num_layer_trainable: int) -> list[int]:
    """The layers LLaMA-Factory trains with `use_llama_pro` (src/llamafactory/model/adapter.py
    `_setup_freeze_tuning`, and model_utils/misc.py `find_expanded_modules` for LoRA): it reads no metadata, it
    assumes one new block at the end of each of `num_layer_trainable` equal groups of the `num_layers` layers,
    and refuses a count that does not divide them."""
    if num_layer_trainable < 1 or num_layers % num_layer_trainable:
        raise PlanError(f"LLaMA-Factory's use_llama_pro needs num_layers {num_layers} divisible by "
                        f"freeze_trainable_layers {num_layer_trainable}")
    stride = num_layers // num_layer_trainable
    return list(range(stride - 1, num_layers + stride - 1, stride))


LLAMA_FACTORY = {"finetuning_type": "freeze", "use_llama_pro": True}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def llama_factory_fit(new: list[int], depth: int, tensor_names=()) -> tuple[dict[str, Any] | None, str]:
    """Whether LLaMA-Factory's use_llama_pro trains exactly the blocks `new` of a `depth`-layer expansion: (its
    settings, or None; why not). It selects parameters whose names contain `.{i}.` for its layers i, so in a model
    whose experts are numbered modules (`experts.3.`) it also trains expert i of every layer."""
    count = len(new)
    picked = llama_pro_layers(depth, count) if count and depth % count == 0 else None
    if picked != new:
        chose = f"would train layers {picked}" if picked is not None else f"refuses {depth} layers in {count} groups"
        return None, (f"the new layers are {new}, but LLaMA-Factory's use_llama_pro with freeze_trainable_layers: "
                      f"{count} {chose}")
    experts = sorted({int(m.group(1)) for n in tensor_names for m in [_EXPERT.search(n)] if m} & set(new))
    if experts:
        return None, (f"the new layers are {new}, but LLaMA-Factory's use_llama_pro selects parameters named "
                      f"'.{{i}}.', which also catches experts {experts} of every layer")
    return {**LLAMA_FACTORY, "freeze_trainable_layers": count}, ""


def training_advice(new: list[int], depth: int, tensor_names=(), out: str = "OUT") -> str:
    """One line for the dry run and the card: how to train exactly the new blocks."""
    settings, why = llama_factory_fit(new, depth, tensor_names)
    if settings is not None:
        return (f"train only the new layers {new}: LLaMA-Factory's finetuning_type: freeze, use_llama_pro: true, "
                f"freeze_trainable_layers: {settings['freeze_trainable_layers']} selects exactly them; or "
                f"composer.freeze_original(model, {out!r})")
    return (f"train only the new layers {new} with composer.freeze_original(model, {out!r}) (or PEFT's "
            f"layers_to_transform: {new}); WARNING: {why}, so do not use it")


def llama_factory_settings(out_dir: str | Path) -> dict[str, Any]:
    """The LLaMA-Factory arguments that train exactly a block expansion's new blocks:
    {"finetuning_type": "freeze", "use_llama_pro": True, "freeze_trainable_layers": <number of new blocks>}.

    PlanError when `use_llama_pro`'s rule (llama_pro_layers) would pick other layers: composer places LLaMA Pro's
    copies as LLaMA Pro does, which puts them where LLaMA-Factory looks only when the copy interval divides the
    source depth (`every: 3` on 4 layers inserts block 3 of 5, LLaMA-Factory would train block 4); and when its
    name match would also catch numbered experts (llama_factory_fit)."""
    prov = _expansion(out_dir)
    settings, why = llama_factory_fit(prov.new_layers, len(prov.layers), prov.tensors)
    if settings is None:
        raise PlanError(
            f"{prov.folder}: {why}: train with composer.freeze_original instead (or PEFT's "
            f"layers_to_transform: {prov.new_layers}), or expand with an `every` that divides the model's depth"
        )
    return settings
