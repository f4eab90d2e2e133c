"""Architecture facts as data: a rule for any decoder whose weights are named `<prefix>.<N>.<rest>`, and a table
of the facts the rule cannot guess, one row per family (keyed by config.json's `model_type`).

The rule: a model's decoder layers are its tensors `<prefix>.<N>.<rest>` (the prefix ends before the first
numeric name component: `model.layers`, `transformer.h`, `gpt_neox.layers`); its depth is the first integer of
`num_hidden_layers`, `n_layer`, `num_layers`; the tensors outside the layers that come before them are the
embeddings (`embed_tokens`, `wte`, `embed_in`, ...), the rest (final norm, head) come after. Per-layer config lists
(`layer_types`, `no_rope_layers`) follow the new layer order.

The table adds, per family: where the rule's guesses are wrong (GPT-2's depth is `n_layer`, GPT-NeoX's head
`embed_out` is no embedding), and which layer tensors, zeroed with their biases, make a block an exact identity
(block expansion is allowed only for families listed here, each proven by a logits test in
tests/test_families.py). Adding a family is one row here plus one fixture there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config lists with one value per layer
EMBEDDINGS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings", "tok_embeddings")
LAYER_NAME = re.compile(r"^(?P<prefix>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class Family:
    """What the rule cannot guess about one architecture family."""

    name: str  # as the README lists it
    model_types: tuple[str, ...]  # config.json's model_type values
    depth: str = "num_hidden_layers"
    embeddings: tuple[str, ...] = EMBEDDINGS  # name fragments of the tensors before the first layer
    # The layer modules whose tensors (weights and biases), zeroed, turn a block into the identity, as prefixes of
    # the name after `<prefix>.<N>.` (`*` stands for an expert's number): each block adds its attention and MLP
    # outputs to the residual stream, and these are the last projections of both (a norm applied to such an
    # output, as Gemma 2/3 and OLMo 2 do, keeps it zero). Empty: block expansion refused, with `refusal`.
    zeroed: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    refusal: str = ""  # why block expansion is refused (zeroed empty)
    # Hybrids: the kind of each of n layers that the config implies (attention or Mamba, experts or dense): every
    # output layer must hold a layer of the kind the output's config gives its position
    kinds: Callable[[Mapping[str, Any], int], list[str]] | None = None
    kinds_rule: str = ""  # the config keys that fix the kinds, for the refusal

    @property
    def expands(self) -> bool:
        return bool(self.zeroed)


def _jamba_kinds(config: Mapping[str, Any], n: int) -> list[str]:
    def every(i: int, key: str) -> bool:
        return i % config[f"{key}_layer_period"] == config[f"{key}_layer_offset"]

    return [f"{'attention' if every(i, 'attn') else 'mamba'}/{'experts' if every(i, 'expert') else 'dense'}"
            for i in range(n)]


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral",)),
    Family("Qwen2", ("qwen2",)),
    Family("Qwen3", ("qwen3",)),
    Family("Gemma", ("gemma",)),
    Family("Gemma 2", ("gemma2",)),
    Family("Gemma 3 (text)", ("gemma3_text",)),
    Family("Phi-3", ("phi3",)),
    Family("GPT-2", ("gpt2",), depth="n_layer", zeroed=("attn.c_proj", "mlp.c_proj")),
    Family("GPT-NeoX", ("gpt_neox",), embeddings=("embed_in",), zeroed=("attention.dense", "mlp.dense_4h_to_h")),
    Family("Falcon", ("falcon",), zeroed=("self_attention.dense", "mlp.dense_4h_to_h")),
    Family("StableLM", ("stablelm",)),
    Family("OLMo 2", ("olmo2",)),
    # MoE blocks as checkpoints store them (and transformers 5 saves them): one module per expert
    Family("Mixtral", ("mixtral",), zeroed=("self_attn.o_proj", "block_sparse_moe.experts.*.w2")),
    Family("Qwen2-MoE", ("qwen2_moe",),
           zeroed=("self_attn.o_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj")),
    Family("Qwen3-MoE", ("qwen3_moe",), zeroed=("self_attn.o_proj", "mlp.experts.*.down_proj")),
    Family("Jamba", ("jamba",), zeroed=(), kinds=_jamba_kinds,
           kinds_rule="attn_layer_period/attn_layer_offset and expert_layer_period/expert_layer_offset",
           refusal="each layer's kind (attention or Mamba, experts or dense) is fixed by its position "
                   "(attn_layer_period/offset, expert_layer_period/offset), and an inserted copy moves every later "
                   "layer by one"),
)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


@dataclass(frozen=True)
class ModuleSpec:
    """One module of a multimodal checkpoint: the prefix of its tensors' names and the sub-config that describes
    it (None: a module without layers, such as a projector)."""

    prefix: str
    config: str | None


# Multimodal families by model_type: mergekit's module names, the names transformers saves them under
MULTIMODAL: dict[str, dict[str, ModuleSpec]] = {
    "gemma3": {"text_decoder": ModuleSpec("language_model.", "text_config"),
               "vision_tower": ModuleSpec("vision_tower.", "vision_config"),
               "multi_modal_projector": ModuleSpec("multi_modal_projector.", None)},
}


def modules(config: Mapping[str, Any]) -> dict[str, ModuleSpec] | None:
    """The modules of a multimodal model (None: not a multimodal family composer knows)."""
    return MULTIMODAL.get(str(config.get("model_type", "")))


def family(config: Mapping[str, Any]) -> Family | None:
    """The table's row for a config (None: a model the rule alone must handle)."""
    return BY_MODEL_TYPE.get(str(config.get("model_type", "")))


def depth_key(config: Mapping[str, Any]) -> str | None:
    """The config key that holds the number of decoder layers (None: no integer one)."""
    row = family(config)
    keys = (row.depth,) if row else DEPTH_KEYS
    return next((k for k in keys if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)), None)


def is_embedding(config: Mapping[str, Any], name: str) -> bool:
    """Whether a tensor outside the layers comes before them (an embedding) rather than after (norm, head)."""
    row = family(config)
    return any(fragment in name for fragment in (row.embeddings if row else EMBEDDINGS))


def under(module: str, suffix: str) -> bool:
    """Whether a layer tensor (its name after `<prefix>.<N>.`) belongs to `module` (`*`: any number)."""
    return re.match(re.escape(module).replace(r"\*", r"\d+") + r"(\.|$)", suffix) is not None


def zeroed(config: Mapping[str, Any], suffix: str) -> bool:
    """Whether a layer tensor (its name after `<prefix>.<N>.`) is zeroed in a block expansion's new blocks."""
    row = family(config)
    return row is not None and any(under(module, suffix) for module in row.zeroed)


def expansion_refusal(config: Mapping[str, Any]) -> str | None:
    """Why block expansion cannot keep this model's function (None: it can)."""
    row = family(config)
    arch = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    if row is None:
        return (f"block expansion keeps the model's function only where zeroing a block's output projections is "
                f"proven to make it the identity; proven for {', '.join(f.name for f in FAMILIES if f.expands)}, "
                f"not for {arch}")
    if not row.expands:
        return f"block expansion cannot keep {row.name}'s function: {row.refusal}"
    return None


def kind_mismatch(base: Mapping[str, Any], n_out: int,
                  placed: list[list[tuple[str, Mapping[str, Any], int, int]]]) -> str | None:
    """For a hybrid: the first output layer that would hold a layer of another kind than the output config gives
    its position. `placed`, per output layer: (model, its config, its depth, source layer) of each input."""
    row = family(base)
    if row is None or row.kinds is None:
        return None
    want = row.kinds(base, n_out)
    for i, inputs in enumerate(placed):
        for model, config, n, j in inputs:
            have = row.kinds(config, n)[j]
            if have != want[i]:
                return (f"output layer {i} would be layer {j} of '{model}', a {have} layer, but {row.name}'s "
                        f"config ({row.kinds_rule}) makes layer {i} a {want[i]} layer: choose layer ranges whose "
                        "shifts keep each layer's kind")
    return None


def table() -> str:
    """The README's table of families: what works for each."""
    rows = ["| family | `model_type` | depth key | slices, merges | block expansion zeroes |", "|---|---|---|---|---|"]
    for f in FAMILIES:
        zero = ", ".join(f"`{z}`" for z in f.zeroed) if f.expands else f"refused: {f.refusal}"
        works = "yes, each layer where the config wants its kind" if f.kinds else "yes"
        rows.append(f"| {f.name} | {', '.join(f'`{t}`' for t in f.model_types)} | `{f.depth}` | {works} | {zero} |")
    for model_type, specs in MULTIMODAL.items():
        names = ", ".join(f"`{name}` (`{spec.prefix}`)" for name, spec in specs.items())
        rows.append(f"| multimodal | `{model_type}` | per module | with `modules:` {names} | not as `block_expansion:` |")
    return "\n".join(rows) + "\n"
