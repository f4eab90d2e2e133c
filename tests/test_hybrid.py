"""A hybrid family, Jamba (Mamba and attention layers, dense and expert MLPs, each fixed by its position in the
config): layers may only go where the output's config puts a layer of their kind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from test_depth import compose
from test_errors import fails
from tinymodels import load_state_dict, save_random

# 8 layers: attention at 2 and 6 (period 4, offset 2), experts at odd layers (period 2, offset 1)
JAMBA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
             num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def jamba(path: Path, seed: int) -> Path:
    return save_random(path, lambda: transformers.JambaForCausalLM(transformers.JambaConfig(**JAMBA)), seed)


@pytest.fixture(scope="module")
def hybrids(tmp_path_factory):
    root = tmp_path_factory.mktemp("jamba")
    return jamba(root / "a", 0), jamba(root / "b", 1)


def test_a_shift_by_the_pattern_period_keeps_every_kind(hybrids, write_recipe, tmp_path):
    a, _ = hybrids
    recipe = write_recipe(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 8]}}]\n"
                          f"  - sources: [{{model: {a}, layer_range: [4, 8]}}]\n")  # a shift of 4: both periods
    out = compose(recipe, tmp_path / "out")
    src, got = load_state_dict(a), load_state_dict(out)
    expected = {n: t for n, t in src.items() if ".layers." not in n}
    for i, j in enumerate([*range(8), *range(4, 8)]):
        expected.update({n.replace(f"layers.{j}.", f"layers.{i}.", 1): t for n, t in src.items()
                         if n.startswith(f"model.layers.{j}.")})
    assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 12
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.layers_block_type[8:] == model.config.layers_block_type[4:8]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 17, 42, 99]])).logits.shape == (1, 4, 256)


def test_a_layer_of_another_kind_is_refused_with_the_layer_numbers(hybrids, write_recipe):
    a, _ = hybrids
    line = fails(write_recipe(f"merge_method: passthrough\nslices:\n"
                              f"  - sources: [{{model: {a}, layer_range: [0, 8]}}]\n"
                              f"  - sources: [{{model: {a}, layer_range: [3, 8]}}]\n"))
    assert f"output layer 8 would be layer 3 of '{a}', a mamba/experts layer" in line
    assert "makes layer 8 a mamba/dense layer" in line


def test_layers_merge_with_layers_of_their_kind(hybrids, write_recipe, tmp_path):
    a, b = hybrids
    recipe = write_recipe(f"merge_method: linear\ndtype: float32\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
                          f"  - {{model: {b}, parameters: {{weight: 0.7}}}}\n")
    got = load_state_dict(compose(recipe, tmp_path / "out"))
    xa, xb = load_state_dict(a), load_state_dict(b)
    w = torch.tensor([0.3, 0.7])
    for name, x in xa.items():
        assert torch.equal(got[name], torch.zeros_like(x).addcmul_(x, w[0]).addcmul_(xb[name], w[1]) / w.sum()), name


def test_block_expansion_is_refused_with_the_reason(hybrids, write_recipe):
    a, _ = hybrids
    line = fails(write_recipe(f"block_expansion: {{model: {a}, every: 4}}\n"))
    assert "block expansion cannot keep Jamba's function" in line and "moves every later layer by one" in line


def test_jamba_v0_1_depth_upscaling_plans_at_full_scale_from_shapes():
    """Jamba-v0.1's published shapes (32 layers, attention every 8th from 4, experts every 2nd from 1, 16 experts)
    on the meta device: a SOLAR-style up-scale by a multiple of 8 plans, with transformers' own count for the new
    depth; a shift by 4 would put an attention layer where the config wants a Mamba layer, and is refused."""
    from transformers.core_model_loading import revert_weight_conversion

    from composer import build_plan, parse_recipe
    from composer.errors import PlanError
    from composer.sources import SourceModel, TensorInfo

    def shapes(layers: int):
        config = transformers.JambaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=65536,
                                          num_experts=16, num_experts_per_tok=2, tie_word_embeddings=False)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        stored = revert_weight_conversion(model, model.state_dict())
        tensors = {n: TensorInfo(n, "BF16", tuple(p.shape), None, 0) for n, p in stored.items()}
        return SourceModel("ai21labs/Jamba-v0.1", None, {**config.to_dict(), "architectures": ["JambaForCausalLM"]},
                           tensors), model.num_parameters()

    source, count = shapes(32)
    name = source.name
    plan = build_plan(parse_recipe(f"merge_method: passthrough\nslices:\n"
                                   f"  - sources: [{{model: {name}, layer_range: [0, 24]}}]\n"
                                   f"  - sources: [{{model: {name}, layer_range: [8, 32]}}]\n"), {name: source})
    assert len(plan.layers) == 48 and plan.config["num_hidden_layers"] == 48
    assert plan.num_parameters == shapes(48)[1] and count < plan.num_parameters
    with pytest.raises(PlanError, match="output layer 24 would be layer 4"):
        build_plan(parse_recipe(f"merge_method: passthrough\nslices:\n"
                                f"  - sources: [{{model: {name}, layer_range: [0, 24]}}]\n"
                                f"  - sources: [{{model: {name}, layer_range: [4, 32]}}]\n"), {name: source})
