"""Every decoder family of composer.architectures, on tiny checkpoints built from transformers' own config classes
(so tensor names and shapes are the real ones): a depth up-scale equals a naive in-memory reference, a linear merge
equals its formula, both load in transformers with the right depth in their config, and block expansion keeps the
logits bit for bit.

The facts each reference needs (the layer prefix, which tensors come before the layers) are written here per
family, from transformers' modelling code, not read from composer's table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from test_depth import compose
from tinymodels import DEFAULT_INPUT_IDS, load_state_dict, save_random

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
HEADS = dict(head_dim=16)
MOE = dict(num_experts_per_tok=2)

# model_type: (config keywords, layer prefix, names of the tensors before the layers, depth key)
FAMILIES = {
    "llama": (SMALL, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "mistral": (SMALL, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "qwen2": (SMALL, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "qwen3": ({**SMALL, **HEADS}, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "gemma": ({**SMALL, **HEADS}, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "gemma2": ({**SMALL, **HEADS, "sliding_window": 8, "query_pre_attn_scalar": 16}, "model.layers",
               ("model.embed_tokens.weight",), "num_hidden_layers"),
    "gemma3_text": ({**SMALL, **HEADS, "sliding_window": 8, "query_pre_attn_scalar": 16}, "model.layers",
                    ("model.embed_tokens.weight",), "num_hidden_layers"),
    "phi3": (SMALL, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "gpt2": (dict(n_embd=64, n_layer=4, n_head=4, vocab_size=256, n_positions=128), "transformer.h",
             ("transformer.wte.weight", "transformer.wpe.weight"), "n_layer"),
    "gpt_neox": ({k: v for k, v in SMALL.items() if k != "num_key_value_heads"}, "gpt_neox.layers",
                 ("gpt_neox.embed_in.weight",), "num_hidden_layers"),
    "falcon": (dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=256), "transformer.h",
               ("transformer.word_embeddings.weight",), "num_hidden_layers"),
    "stablelm": (SMALL, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "olmo2": (SMALL, "model.layers", ("model.embed_tokens.weight",), "num_hidden_layers"),
    "mixtral": ({**SMALL, **MOE, "num_local_experts": 4}, "model.layers", ("model.embed_tokens.weight",),
                "num_hidden_layers"),
    "qwen2_moe": ({**SMALL, **MOE, "num_experts": 4, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64}, "model.layers", ("model.embed_tokens.weight",),
                  "num_hidden_layers"),
    "qwen3_moe": ({**SMALL, **HEADS, **MOE, "num_experts": 4, "moe_intermediate_size": 32}, "model.layers",
                  ("model.embed_tokens.weight",), "num_hidden_layers"),
}


# The modules whose output a block adds to the residual stream last (default: self_attn.o_proj, mlp.down_proj)
ZEROED = {
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "mixtral": ("self_attn.o_proj", *(f"block_sparse_moe.experts.{e}.w2" for e in range(4))),
    "qwen2_moe": ("self_attn.o_proj", *(f"mlp.experts.{e}.down_proj" for e in range(4)), "mlp.shared_expert.down_proj"),
    "qwen3_moe": ("self_attn.o_proj", *(f"mlp.experts.{e}.down_proj" for e in range(4))),
}


def build(path: Path, model_type: str, seed: int) -> Path:
    """A tiny random checkpoint of a family, saved by transformers itself, with a tokenizer."""
    kwargs, *_ = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **kwargs, **IDS, tie_word_embeddings=False)
    return save_random(path, lambda: transformers.AutoModelForCausalLM.from_config(config), seed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {(t, seed): build(root / f"{t}-{seed}", t, seed) for t in FAMILIES for seed in (0, 1)}


@torch.no_grad()
def family_logits(path: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return model(input_ids=torch.tensor([DEFAULT_INPUT_IDS])).logits


def split(sd: dict, prefix: str) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    other = {}
    for name, t in sd.items():
        if name.startswith(prefix + "."):
            layer, rest = name[len(prefix) + 1:].split(".", 1)
            layers.setdefault(int(layer), {})[rest] = t
        else:
            other[name] = t
    return layers, other


@pytest.mark.parametrize("model_type", FAMILIES)
def test_depth_upscaling_equals_reference(checkpoints, write_recipe, tmp_path, model_type):
    _, prefix, before, depth = FAMILIES[model_type]
    src = checkpoints[model_type, 0]
    recipe = write_recipe(f"merge_method: passthrough\nslices:\n"
                          f"  - sources: [{{model: {src}, layer_range: [0, 3]}}]\n"
                          f"  - sources: [{{model: {src}, layer_range: [1, 4]}}]\n")
    out = compose(recipe, tmp_path / "out")
    layers, other = split(load_state_dict(src), prefix)
    expected = {n: t for n, t in other.items()}
    for i, source in enumerate([0, 1, 2, 1, 2, 3]):
        expected.update({f"{prefix}.{i}.{rest}": t for rest, t in layers[source].items()})
    got = load_state_dict(out)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    config = json.loads((out / "config.json").read_text())
    assert config[depth] == 6
    source_config = json.loads((src / "config.json").read_text())
    if isinstance(source_config.get("layer_types"), list):
        assert config["layer_types"] == [source_config["layer_types"][i] for i in (0, 1, 2, 1, 2, 3)]
    assert family_logits(out).shape == (1, len(DEFAULT_INPUT_IDS), 256)  # loads and runs in transformers
    assert set(before) <= set(got)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_linear_merge_equals_its_formula(checkpoints, write_recipe, tmp_path, model_type):
    a, b = checkpoints[model_type, 0], checkpoints[model_type, 1]
    recipe = write_recipe(f"merge_method: linear\ndtype: float32\nmodels:\n"
                          f"  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
                          f"  - {{model: {b}, parameters: {{weight: 0.7}}}}\n")
    got = load_state_dict(compose(recipe, tmp_path / "out"))
    xa, xb = load_state_dict(a), load_state_dict(b)
    w = torch.tensor([0.3, 0.7])
    assert sorted(got) == sorted(xa)
    for name, x in xa.items():  # mergekit's linear, written plainly: addcmul in input order, then / sum(w)
        expected = torch.zeros_like(x).addcmul_(x, w[0]).addcmul_(xb[name], w[1]) / w.sum()
        assert torch.equal(got[name], expected), name
    assert family_logits(tmp_path / "out").shape[-1] == 256


@pytest.mark.parametrize("model_type", FAMILIES)
def test_block_expansion_keeps_logits_bit_for_bit(checkpoints, write_recipe, tmp_path, model_type):
    _, prefix, _, depth = FAMILIES[model_type]
    src = checkpoints[model_type, 0]
    out = compose(write_recipe(f"block_expansion: {{model: {src}, every: 2}}\n"), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config[depth] == 6
    layers, _ = split(load_state_dict(out), prefix)
    zeroed = {i: sorted(n for n, t in layers[i].items() if torch.count_nonzero(t) == 0) for i in layers}
    assert [i for i, names in zeroed.items() if names] == [2, 5]  # every: 2 puts a copy after layers 1 and 3
    modules = ZEROED.get(model_type, ("self_attn.o_proj", "mlp.down_proj"))
    assert zeroed[2] == sorted(n for n in layers[2] if any(n.startswith(m + ".") or n == m for m in modules))
    assert torch.equal(family_logits(out), family_logits(src))


def test_every_family_of_the_table_is_tested_here_and_listed_in_the_readme():
    from composer.architectures import FAMILIES, table

    assert {t for f in FAMILIES for t in f.model_types} == set(FAMILIES_TESTED)
    assert table() in (Path(__file__).resolve().parents[1] / "README.md").read_text()


FAMILIES_TESTED = (*FAMILIES, "jamba")  # the hybrid: tests/test_hybrid.py (its layers keep their kinds)


# ------------------------------------------------------------------------------------ full scale, from shapes

FULL_SCALE = {  # the published configs' shapes; transformers builds them on the meta device (no memory)
    "Gemma-2-9B": transformers.Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                            num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                            vocab_size=256000),
    "Qwen3-8B": transformers.Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                         vocab_size=151936, tie_word_embeddings=False),
    "Phi-3-mini": transformers.Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                          pad_token_id=32000),
    "GPT-2 XL": transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "Pythia-6.9B": transformers.GPTNeoXConfig(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                                              num_attention_heads=32, vocab_size=50432, tie_word_embeddings=False),
    "Falcon-7B": transformers.FalconConfig(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                                           vocab_size=65024, multi_query=True, parallel_attn=True,
                                           new_decoder_architecture=False, bias=False),
    "OLMo-2-7B": transformers.Olmo2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=100352),
    "Qwen2-7B": transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                         tie_word_embeddings=False),
    "Gemma-7B": transformers.GemmaConfig(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                                         num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                                         vocab_size=256000),
    "Gemma-3-12B (text)": transformers.Gemma3TextConfig(hidden_size=3840, intermediate_size=15360,
                                                        num_hidden_layers=48, num_attention_heads=16,
                                                        num_key_value_heads=8, head_dim=256, vocab_size=262208),
    "StableLM-2-1.6B": transformers.StableLmConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                                   num_attention_heads=32, num_key_value_heads=32,
                                                   vocab_size=100352, tie_word_embeddings=False),
    "Mixtral-8x7B": transformers.MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                               num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False),
    "Qwen1.5-MoE-A2.7B": transformers.Qwen2MoeConfig(hidden_size=2048, intermediate_size=5632,
                                                     num_hidden_layers=24, num_attention_heads=16,
                                                     num_key_value_heads=16, vocab_size=151936, num_experts=60,
                                                     num_experts_per_tok=4, moe_intermediate_size=1408,
                                                     shared_expert_intermediate_size=5632,
                                                     tie_word_embeddings=False),
    "Qwen3-30B-A3B": transformers.Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                                 num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                                 tie_word_embeddings=False),
}
# Parameter counts as their model cards publish them, for the base models whose count is well known
PUBLISHED = {"Gemma-2-9B": 9_241_705_984, "GPT-2 XL": 1_557_611_200, "Falcon-7B": 6_921_720_704,
             "Mixtral-8x7B": 46_702_792_704}


def shapes(name: str, config) -> "SourceModel":
    """A source model with the tensor names and shapes the checkpoint stores (a tied head is not stored)."""
    from composer.sources import SourceModel, TensorInfo

    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tied = getattr(config, "tie_word_embeddings", False)
    stored = revert_weight_conversion(model, model.state_dict())  # as save_pretrained names them (MoE experts)
    tensors = {n: TensorInfo(n, "BF16", tuple(p.shape), None, 0) for n, p in stored.items()
               if not (tied and n == "lm_head.weight")}
    return SourceModel(name=name, path=None, config={**config.to_dict(), "architectures": [type(model).__name__]},
                       tensors=tensors), model.num_parameters()


@pytest.mark.parametrize("name", FULL_SCALE)
def test_block_expansion_plans_at_full_scale_from_shapes(name):
    """`every: 4` on each family's published shapes: checked against transformers' own model at the new depth,
    built on the meta device from the same config with only the depth changed (its parameter count is what the
    expanded checkpoint must hold), and the base count against the published one where listed."""
    from composer import build_plan, parse_recipe
    from composer.architectures import depth_key

    config = FULL_SCALE[name]
    source, base_count = shapes(name, config)
    key = depth_key(source.config)
    n = source.config[key]
    assert base_count == PUBLISHED.get(name, base_count)
    plan = build_plan(parse_recipe(f"block_expansion: {{model: {name}, every: 4}}\n"), {name: source})
    grown = n + n // 4
    assert len(plan.layers) == grown and plan.config[key] == grown
    assert [la.index for la in plan.layers if la.status == "new"] == [5 * k + 4 for k in range(n // 4)]
    bigger = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
    bigger[key] = grown
    _, expected = shapes(name, type(config)(**bigger))
    assert plan.num_parameters == expected
    assert all(t.op == "zeros" for t in plan.tensors if ".%d." % plan.layers[4].index in t.name
               and any(m in t.name for m in ZEROED.get(source.config["model_type"], ("o_proj", "down_proj"))))
