"""Mixture of experts from dense models: mergekit-moe 0.1.5's YAML, planned and streamed like every other recipe.

A recipe with `experts:` is a mergekit-moe config (mergekit/moe/config.py): `base_model`, `experts` (each
`source_model`, `positive_prompts`, `negative_prompts`, `noise_scale`, `residual_scale`), `gate_mode`, `dtype`,
`experts_per_token`, `shared_experts`, `architecture`. The output architecture is chosen as mergekit-moe chooses it
(mergekit/scripts/moe.py): Mixtral when it fits (no shared experts, Llama or Mistral inputs), else the first that
fits of DeepSeek (refused by name: not built), Qwen MoE (exactly one shared expert; Llama, Mistral or Qwen2 inputs),
Qwen3 MoE (Qwen3 inputs, no shared experts); `architecture:` narrows the choice by name prefix, as mergekit does.

Attention, norms, embeddings and head are the base model's; each layer's MLP is every expert's, in mergekit-moe's
tensor layout (Mixtral and Qwen3 MoE: `experts.gate_up_proj` [E, 2I, H], each expert's gate then up rows, and
`experts.down_proj` [E, H, I]; Qwen MoE: one tensor per expert, plus `shared_expert` and `shared_expert_gate`).
Expert tensors are read in place and written as they are (cast to the output dtype, with `noise_scale` noise and
`residual_scale` on `down_proj` where the recipe asks), so memory stays that of the streaming core. The routers
(`mlp.gate`) come from mergekit-moe's gate modes (mergekit/moe/router.py):

- `random` / `uniform_random`: torch.randn / torch.rand of shape (layers, experts, hidden) from a generator
  seeded with `--seed` (mergekit-moe with `--random-seed` draws the same numbers);
- `cheap_embed`: per expert, the base's embedding rows of its prompts (each prefixed with the BOS token, padded on
  the left), summed over the unpadded tokens and prompts, minus the same of the negative prompts, normalised; the
  same vector for every layer;
- `hidden` (mergekit's default; the last token's hidden state) and `hidden_avg` (the mean over tokens): the base
  model's hidden state entering each layer, run by transformers on CPU in bfloat16 as mergekit-moe runs it, averaged
  over the prompts, positive minus negative, normalised. This pass loads the base model (its bfloat16 size in
  memory): the one step outside the streaming bound; it runs before any weight is written, never in a dry run.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Mapping

from pydantic import StrictFloat, StrictInt, StrictStr, model_validator

from composer.errors import PlanError
from composer.recipe import DTYPES, _Strict
from composer.sources import Derived, SourceModel, TensorInfo

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
# mergekit-moe's output architectures, in its order of preference: (name, model types it takes, shared experts)
ARCHITECTURES = (("Mixtral", ("llama", "mistral"), 0), ("DeepSeek", ("llama", "mistral"), None),
                 ("Qwen MoE", ("llama", "mistral", "qwen2"), 1), ("Qwen3 MoE", ("qwen3",), 0))
NOISE_BLOCK = 1 << 20  # noise is drawn per block of this many elements, each seeded on its own: chunk-independent


class Expert(_Strict):
    source_model: StrictStr
    positive_prompts: list[StrictStr] | None = None
    negative_prompts: list[StrictStr] | None = None
    noise_scale: StrictFloat | StrictInt | None = None
    residual_scale: StrictFloat | StrictInt | None = None


class MoeRecipe(_Strict):
    """A mergekit-moe config."""

    name: StrictStr | None = None  # a stage of a multi-document recipe
    base_model: StrictStr
    experts: list[Expert]
    gate_mode: StrictStr = "hidden"
    dtype: StrictStr | None = None
    experts_per_token: StrictInt = 2
    shared_experts: list[Expert] | None = None
    architecture: StrictStr | None = None
    tokenizer_source: StrictStr | None = None  # mergekit-moe 0.1.5 ignores it and ships the base's tokenizer

    # what the rest of composer asks every recipe
    merge_method: ClassVar[None] = None
    out_dtype: ClassVar[None] = None
    parameters: ClassVar[None] = None
    slices: ClassVar[None] = None
    models: ClassVar[None] = None
    block_expansion: ClassVar[None] = None
    interleave: ClassVar[None] = None
    modules: ClassVar[None] = None
    tokenizer: ClassVar[None] = None
    chat_template: ClassVar[None] = None
    vocabulary_source: ClassVar[None] = None
    form: ClassVar[str] = "moe"

    @model_validator(mode="after")
    def _sane(self) -> MoeRecipe:
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode '{self.gate_mode}' is not one of {', '.join(GATE_MODES)}")
        if not self.experts:
            raise ValueError("experts is empty: name at least experts_per_token models")
        if self.experts_per_token < 1:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be at least 1")
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"experts_per_token={self.experts_per_token} is more than the {len(self.experts)} "
                             "experts: lower it or add experts")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}' (use bfloat16, float16 or float32)")
        if self.tokenizer_source not in (None, "base"):
            raise ValueError("mergekit-moe 0.1.5 ignores tokenizer_source and ships the base model's tokenizer: "
                             "drop it or set it to base")
        if not self.gate_mode.endswith("random"):
            for k, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"expert {k} ('{e.source_model}') has no positive_prompts, which gate_mode "
                                     f"{self.gate_mode} needs: give each expert prompts, or use gate_mode: random")
            prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise ValueError("every expert has the same prompts, so every router row would be the same: give "
                                 "each expert prompts for what it should get")
        shared = self.shared_experts or []
        with_prompts = {bool(e.positive_prompts) for e in shared}
        if len(with_prompts) > 1:
            raise ValueError("give prompts to every shared expert or to none (as mergekit-moe requires)")
        return self

    def referenced_models(self) -> list[str]:
        names = [self.base_model, *(e.source_model for e in self.experts),
                 *(e.source_model for e in self.shared_experts or [])]
        return list(dict.fromkeys(names))


def _architecture(recipe: MoeRecipe, sources: Mapping[str, SourceModel]) -> str:
    names = [n for n, _, _ in ARCHITECTURES]
    candidates = [a for a in ARCHITECTURES
                  if recipe.architecture is None or a[0].lower().startswith(recipe.architecture.lower())]
    if not candidates:
        raise PlanError(f"no MoE output architecture is named '{recipe.architecture}' (mergekit-moe's: "
                        f"{', '.join(names)}; composer builds Mixtral, Qwen MoE and Qwen3 MoE)")
    types = {sources[m].config.get("model_type") for m in recipe.referenced_models()}
    shared = len(recipe.shared_experts or [])
    fits = []
    for name, takes, needs in candidates:
        if len(types) != 1 or next(iter(types)) not in takes:
            continue
        if needs is not None and shared != needs:
            continue
        if name == "Qwen MoE" and not recipe.gate_mode.endswith("random") and not recipe.shared_experts[0].positive_prompts:
            continue
        fits.append(name)
    if not fits:
        raise PlanError(f"no MoE output architecture fits these models (model types: {', '.join(sorted(map(str, types)))}"
                        f"; {shared} shared experts): Mixtral takes Llama or Mistral models and no shared experts, "
                        "Qwen MoE exactly one shared expert, Qwen3 MoE Qwen3 models")
    chosen = "Mixtral" if "Mixtral" in fits else fits[0]
    if chosen == "DeepSeek":
        raise PlanError("mergekit-moe would build a DeepSeek MoE for these models, which composer does not build: "
                        "set architecture: qwen for a Qwen MoE (one shared expert), or drop the shared experts for "
                        "a Mixtral")
    return chosen


def _out_dtype(recipe: MoeRecipe, base: SourceModel) -> str:
    from composer.dtypes import ST_DTYPE

    name = DTYPES.get(recipe.dtype or "") or base.config.get("dtype") or base.config.get("torch_dtype") or "float32"
    if name not in ST_DTYPE:
        raise PlanError(f"'{base.name}' has dtype {name!r} in config.json: set dtype in the recipe")
    return ST_DTYPE[name]


def _config(arch: str, base: SourceModel, recipe: MoeRecipe, out_dtype: str) -> dict[str, Any]:
    """The output config.json, made with transformers' config classes as mergekit-moe makes it (its diff form)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in base.config.items() if k != "transformers_version"})
    n = len(recipe.experts)
    if arch == "Mixtral":
        if not isinstance(cfg, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**cfg.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = cfg.max_position_embeddings
            cfg = mistral
        out = transformers.MixtralConfig(**cfg.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = n
        out.num_experts_per_tok = recipe.experts_per_token
        out.sliding_window = None
    else:  # the Qwen MoEs: every layer sparse, top-k weights renormalised, experts as wide as the dense MLP
        qwen2 = arch == "Qwen MoE"
        out = (transformers.Qwen2MoeConfig if qwen2 else transformers.Qwen3MoeConfig)(**cfg.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM" if qwen2 else "Qwen3MoeForCausalLM"]
        out.num_experts = n
        out.num_experts_per_tok = recipe.experts_per_token
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.moe_intermediate_size = out.intermediate_size
        if qwen2:  # as mergekit-moe's qwen.py; its qwen3.py leaves the window settings as they are
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
    from composer.dtypes import DTYPE_NAME

    out.dtype = DTYPE_NAME[out_dtype]
    types = getattr(out, "layer_types", None)
    if types and "sliding_attention" in types and (out.sliding_window is None or not getattr(out, "use_sliding_window", True)):
        # mergekit-moe turns the sliding window off but keeps a base's sliding layer_types, and transformers then
        # cannot run the model (tests/test_moe.py); every layer attends fully, as the window setting says
        out.layer_types = ["full_attention"] * len(types)
    return out.to_diff_dict()


@dataclass(frozen=True, eq=False)
class Part:
    """One expert tensor inside a fused output tensor, with mergekit-moe's noise and residual scale."""

    info: Any  # TensorInfo (or Derived)
    noise: float | None = None
    scale: float | None = None
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Concat(Derived):
    """An output tensor made of whole source tensors back to back (experts stacked), cast to `dtype`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]

    @property
    def status(self) -> str:
        """provenance: "stacked" (the parts' values, cast), or "noised" (noise_scale / residual_scale applied)."""
        return "noised" if any(p.noise is not None or p.scale is not None for p in self.parts) else "stacked"

    def read(self, sources, start: int, stop: int):
        import torch

        from composer.dtypes import torch_dtype

        out = torch.empty(stop - start, dtype=torch_dtype(self.dtype))
        offset = 0
        for part in self.parts:
            n = part.info.numel
            a, b = max(start, offset), min(stop, offset + n)
            if a < b:
                out[a - start: b - start] = _part_values(part, sources, a - offset, b - offset)
            offset += n
            if offset >= stop:
                break
        return out


def _part_values(part: Part, sources, a: int, b: int):
    """Elements [a, b) of one expert tensor: noise then residual scale in the source dtype, as mergekit-moe."""
    import torch

    x = sources.tensor(part.info, a, b)
    if part.noise is not None:
        x = x + _noise(part.seed, a, b, x.dtype) * part.noise
    if part.scale is not None:
        x = x * part.scale
    return x


def _noise(seed: int, a: int, b: int, dtype):
    """Standard normal noise for elements [a, b) of one tensor, the same however the range is cut."""
    import torch

    pieces = []
    for block in range(a // NOISE_BLOCK, -(-b // NOISE_BLOCK)):
        g = torch.Generator().manual_seed((seed + block * 0x9E3779B97F4A7C15) % 2**63)
        values = torch.randn(NOISE_BLOCK, generator=g, dtype=torch.float32)
        lo, hi = max(a, block * NOISE_BLOCK) - block * NOISE_BLOCK, min(b, (block + 1) * NOISE_BLOCK) - block * NOISE_BLOCK
        pieces.append(values[lo:hi])
    return torch.cat(pieces).to(dtype)


@dataclass(eq=False)
class Gates:
    """The router vectors, (layers, experts + shared, hidden), computed once when first needed."""

    recipe: MoeRecipe
    base: SourceModel
    layers: int
    hidden: int
    seed: int
    _value: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def value(self, sources=None):
        with self._lock:
            if self._value is None:
                self._value = gate_vectors(self.recipe, self.base, self.layers, self.hidden, self.seed, sources)
            return self._value


@dataclass(frozen=True, eq=False)
class Router(Derived):
    """One layer's router weight: rows `rows` of the gate vectors, cast to `dtype`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    gates: Gates
    layer: int
    rows: tuple[int, int]
    status = "router"  # provenance: initialised from the gate mode, not copied

    def read(self, sources, start: int, stop: int):
        from composer.dtypes import torch_dtype

        g = self.gates.value(sources)[self.layer, self.rows[0]: self.rows[1]]
        return g.to(torch_dtype(self.dtype)).reshape(-1)[start:stop]


def _prompt_tokenizer(base: SourceModel):
    """The base tokenizer as mergekit-moe sets it up for prompts: left padding, BOS (else EOS) as the pad token."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(base.path))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok, prompts: list[str]):
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)


def gate_experts(recipe: MoeRecipe) -> list[Expert]:
    """The experts that get router vectors: every expert, then the shared ones where they have prompts (or the
    gates are random), as mergekit-moe counts them."""
    shared = recipe.shared_experts or []
    if shared and (shared[0].positive_prompts or recipe.gate_mode.endswith("random")):
        return [*recipe.experts, *shared]
    return list(recipe.experts)


def gate_vectors(recipe: MoeRecipe, base: SourceModel, layers: int, hidden: int, seed: int, sources=None):
    import torch

    experts = gate_experts(recipe)
    shape = (layers, len(experts), hidden)
    if recipe.gate_mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if recipe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale
    tok = _prompt_tokenizer(base)
    if recipe.gate_mode == "cheap_embed" and sources is None:
        from composer.reading import Sources

        own = Sources()
        try:
            return gate_vectors(recipe, base, layers, hidden, seed, own)
        finally:
            own.close()
    if recipe.gate_mode == "cheap_embed":
        embed = base.tensors["model.embed_tokens.weight"]

        def run(batch):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            rows = sources.tensor(embed).reshape(embed.shape[0], -1)
            h = rows[ids.reshape(-1)].reshape(*ids.shape, -1).float()
            total = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.bfloat16)
        model.eval()

        def run(batch):
            with torch.no_grad():
                out = model(**batch, output_hidden_states=True, return_dict=True)
            states = torch.stack(out.hidden_states[:-1])
            states = (states.sum(dim=2) / states.shape[2] if recipe.gate_mode == "hidden_avg"
                      else states[:, :, -1, :])
            return states.sum(dim=1) / states.shape[1]

    vecs = []
    for e in experts:
        v = run(_tokenize(tok, e.positive_prompts))
        if e.negative_prompts:
            v -= run(_tokenize(tok, e.negative_prompts))
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(v)
    return torch.stack(vecs, dim=0).permute(1, 0, 2)


def _seed(seed: int, name: str, k: int) -> int:
    from composer.blocks import tensor_seed

    return tensor_seed(seed, f"{name}#{k}")


def build_moe_plan(recipe: MoeRecipe, sources: Mapping[str, SourceModel], *, shard_size: int, recipe_text: str,
                   recipe_path: str, seed: int):
    from composer.tensorplan import LayerPlan, Plan, TensorPlan
    from composer.writer import layout_shards

    missing = [m for m in recipe.referenced_models() if m not in sources]
    if missing:
        raise PlanError(f"model '{missing[0]}' was not resolved")
    base = sources[recipe.base_model]
    arch = _architecture(recipe, sources)
    out_dtype = _out_dtype(recipe, base)
    layers = base.num_layers
    hidden = base.config.get("hidden_size")
    mlp = [n for n in base.tensors if ".mlp." in n]
    for e in [*recipe.experts, *(recipe.shared_experts or [])]:
        src = sources[e.source_model]
        if src.num_layers != layers:
            raise PlanError(f"expert '{e.source_model}' has {src.num_layers} layers and the base model "
                            f"'{base.name}' {layers}: every expert needs the base's depth")
        for n in mlp:
            theirs = src.tensors.get(n)
            if theirs is None or theirs.shape != base.tensors[n].shape:
                got = "no such tensor" if theirs is None else list(theirs.shape)
                raise PlanError(f"expert '{e.source_model}' has '{n}' {got}, the base model "
                                f"{list(base.tensors[n].shape)}: the experts' shapes differ from the base's")
    tensors: list = []

    def copy(name: str, info, model: str, **where) -> None:
        tensors.append(TensorPlan(name=name, op="copy", inputs=(info,), models=(model,), dtype=out_dtype, **where))

    for name, info in base.tensors.items():
        if ".mlp." not in name:
            copy(name, info, base.name)
    gates = Gates(recipe, base, layers, hidden, seed)
    n = len(recipe.experts)
    layer_plans = []
    for i in range(layers):
        pre = f"model.layers.{i}.mlp"
        where = dict(layer=i, source_layer=i)
        kinds = ("gate_proj", "up_proj", "down_proj")
        if arch in ("Mixtral", "Qwen3 MoE"):
            def part(e: Expert, kind: str) -> Part:
                name = f"{pre}.{kind}.weight"
                return Part(sources[e.source_model].tensors[name], e.noise_scale,
                            e.residual_scale if kind == "down_proj" else None,
                            _seed(seed, name, recipe.experts.index(e)))
            g, d = (base.tensors[f"{pre}.{k}.weight"].shape for k in ("gate_proj", "down_proj"))
            gate_up = Concat(f"{pre}.experts.gate_up_proj", out_dtype, (n, 2 * g[0], g[1]),
                             tuple(p for e in recipe.experts for p in (part(e, "gate_proj"), part(e, "up_proj"))))
            down = Concat(f"{pre}.experts.down_proj", out_dtype, (n, *d), tuple(part(e, "down_proj")
                                                                           for e in recipe.experts))
            for t in (gate_up, down):
                tensors.append(TensorPlan(name=t.name, op="copy", inputs=(t,), models=(recipe.experts[0].source_model,),
                                          dtype=out_dtype, **where))
        else:
            shared = recipe.shared_experts[0]
            for kind in kinds:
                name = f"{pre}.{kind}.weight"
                for k, e in enumerate([*recipe.experts, shared]):
                    target = f"{pre}.shared_expert.{kind}.weight" if k == n else f"{pre}.experts.{k}.{kind}.weight"
                    info = sources[e.source_model].tensors[name]
                    if e.noise_scale is not None or (kind == "down_proj" and e.residual_scale is not None):
                        info = Concat(target, out_dtype, info.shape, (Part(info, e.noise_scale, e.residual_scale
                                                                           if kind == "down_proj" else None,
                                                                           _seed(seed, target, k)),))
                    copy(target, info, e.source_model, **where)
        router = Router(f"{pre}.gate.weight", out_dtype, (n, hidden), gates, i, (0, n))
        tensors.append(TensorPlan(name=router.name, op="copy", inputs=(router,), models=(base.name,), dtype=out_dtype,
                                  **where))
        if arch == "Qwen MoE":
            shared_gate = Router(f"{pre}.shared_expert_gate.weight", out_dtype, (1, hidden), gates, i, (n, n + 1))
            tensors.append(TensorPlan(name=shared_gate.name, op="copy", inputs=(shared_gate,), models=(base.name,),
                                      dtype=out_dtype, **where))
        layer_plans.append(LayerPlan(i, base.name, i, "experts", (),
                                     tuple((e.source_model, i) for e in [*recipe.experts,
                                                                         *(recipe.shared_experts or [])])))
    if arch == "Qwen MoE":  # Qwen2-MoE has attention biases; a Llama or Mistral base has none: zeros, as mergekit
        heads, kv = base.config["num_attention_heads"], base.config.get("num_key_value_heads") or base.config["num_attention_heads"]
        head_dim = hidden // heads
        for i in range(layers):
            for proj, count in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
                name = f"model.layers.{i}.self_attn.{proj}.bias"
                if name not in base.tensors:
                    zeros = TensorInfo(name, out_dtype, (count * head_dim,), None, 0)
                    tensors.append(TensorPlan(name=name, op="zeros", inputs=(zeros,), models=(base.name,),
                                              dtype=out_dtype, layer=i, source_layer=i))
    config = _config(arch, base, recipe, out_dtype)
    notes = [f"mixture of experts: {arch} ({config['architectures'][0]}), {n} experts, {recipe.experts_per_token} "
             f"per token{', 1 shared' if arch == 'Qwen MoE' else ''}; attention, norms and embeddings from "
             f"'{base.name}'", gate_note(recipe, base, layers)]
    if len({e.source_model for e in recipe.experts}) == 1:
        notes.append("every expert is the same model: the MoE computes what that model computes (with every "
                     "router) and uses more memory, until it is trained (mergekit-moe refuses this without "
                     "--i-understand-this-is-not-useful-without-training)")
    return Plan(recipe=recipe, operation="moe", base=base.name, tokenizer_from=base.name, sources=sources,
                tensors=tuple(tensors), layers=tuple(layer_plans), config=config,
                shards=layout_shards(tensors, shard_size), recipe_text=recipe_text, recipe_path=recipe_path,
                notes=tuple(notes), seed=seed, prepare=gates.value)


def gate_note(recipe: MoeRecipe, base: SourceModel, layers: int) -> str:
    """What the router initialisation will do and cost: prompt token counts, and for `hidden` the forward passes."""
    mode = recipe.gate_mode
    if mode.endswith("random"):
        return f"routers: {mode} (torch, seeded with --seed)"
    counts = []
    try:
        tok = _prompt_tokenizer(base) if base.path is not None else None
    except Exception:  # noqa: BLE001 - a note only; the run itself reports a broken tokenizer
        tok = None
    total = 0
    for e in gate_experts(recipe):
        pos = sum(len(ids) for ids in tok([(tok.bos_token or "") + p for p in e.positive_prompts],
                                          add_special_tokens=False)["input_ids"]) if tok else None
        neg = sum(len(ids) for ids in tok([(tok.bos_token or "") + p for p in e.negative_prompts or []],
                                          add_special_tokens=False)["input_ids"]) if tok and e.negative_prompts else 0
        total += (pos or 0) + (neg or 0)
        counts.append(f"'{e.source_model}' {pos if pos is not None else '?'}+{neg}")
    text = f"routers: {mode} from the prompts' tokens (positive+negative per expert: {', '.join(counts)})"
    if mode.startswith("hidden"):
        params = sum(t.numel for t in base.tensors.values())
        gb = params * 2 / 1e9
        seconds = gb / 0.5 + 2 * params * max(total, 1) / 20e9  # load at ~0.5 GB/s, ~20 GFLOP/s in bfloat16 on CPU
        text += (f"; computed before writing by {sum(1 + bool(e.negative_prompts) for e in gate_experts(recipe))} forward passes of '{base.name}' in "
                 f"bfloat16 (about {gb:.1f} GB of memory, about {seconds:.0f} s here)")
    return text
