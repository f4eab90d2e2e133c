"""Full-scale plans from shapes alone (meta device, no weights), and the plan as data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from composer import build_plan, load_recipe
from composer.cli import main
from composer.errors import PlanError
from composer.depth import expansion_layers
from composer.report import summary
from composer.sources import SourceModel, TensorInfo
from tinymodels import load_state_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

MISTRAL_7B = transformers.MistralConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, sliding_window=4096, tie_word_embeddings=False,
)
LLAMA_2_7B = transformers.LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, tie_word_embeddings=False,
)


def shapes_only(name: str, config: transformers.PretrainedConfig) -> SourceModel:
    """A source model with the real tensor names and shapes of `config`, built on the meta device: no memory."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tensors = {n: TensorInfo(n, "BF16", tuple(p.shape), None, 0) for n, p in model.state_dict().items()}
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    return SourceModel(name=name, path=None, config=cfg, tensors=tensors)


def test_solar_full_scale():
    recipe = load_recipe(RECIPES / "solar.yaml")
    plan = build_plan(recipe, {"mistralai/Mistral-7B-v0.1": shapes_only("mistralai/Mistral-7B-v0.1", MISTRAL_7B)})
    assert len(plan.layers) == 48
    assert len(plan.tensors) == 435
    assert plan.num_parameters == 10_731_524_096
    assert plan.config["num_hidden_layers"] == 48
    assert [la.source_layer for la in plan.layers] == [*range(24), *range(8, 32)]
    assert plan.operation == "depth-upscaling"
    assert len(plan.shards) == 5 and plan.total_bytes == 2 * 10_731_524_096
    assert all(t.is_byte_copy for t in plan.tensors)  # bf16 in, bf16 out: every tensor is a byte copy
    assert plan.compute_memory == 0  # nothing to compute: memory is the output chunks alone
    assert summary(plan)["peak_memory_bytes"] < 300 * 2**20


def test_llama_pro_full_scale():
    recipe = load_recipe(RECIPES / "llama-pro.yaml")
    plan = build_plan(recipe, {"meta-llama/Llama-2-7b-hf": shapes_only("meta-llama/Llama-2-7b-hf", LLAMA_2_7B)})
    assert len(plan.layers) == 40
    assert len(plan.tensors) == 363
    assert plan.num_parameters == 8_357_482_496
    new = [la.index for la in plan.layers if la.status == "new"]
    assert new == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [plan.layers[i].source_layer for i in new] == [3, 7, 11, 15, 19, 23, 27, 31]
    zeroed = sorted(t.name for t in plan.tensors if t.op == "zeros")
    assert len(zeroed) == 16 and all("o_proj" in z or "down_proj" in z for z in zeroed)
    # The README's LLaMA-Factory example (freeze_trainable_layers: 8) is this recipe's: its rule picks these layers.
    from composer.report import summary

    assert summary(plan)["training"]["llama_factory"] == {"finetuning_type": "freeze", "use_llama_pro": True,
                                                          "freeze_trainable_layers": 8}


def test_llama_pro_placement_matches_the_published_script():
    for n, target in ((32, 40), (32, 48), (32, 38), (24, 30), (4, 5)):
        split = int(n / (target - n))
        expected = []
        for i in range(n):
            expected.append((i, False))
            if (i + 1) % split == 0:
                expected.append((i, True))
        assert expansion_layers(n, num_layers=target) == expected


@pytest.mark.parametrize(("target", "message"), [
    (41, "use 40 (a copy every 4) or 42 (a copy every 3)"),
    (32, "between 33 and 64"),
    (65, "between 33 and 64"),
])
def test_unplaceable_expansion_says_what_would_work(target, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expansion_layers(32, num_layers=target)


def test_dry_run_prints_the_plan(models, write_recipe, tmp_path):
    src = models["llama"]
    recipe = write_recipe(f"block_expansion: {{model: {src}, every: 2}}\n")
    result = CliRunner().invoke(main, [str(recipe), "--dry-run", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "-> 6" in text and "2 <- " in text and "new (down_proj, o_proj zeroed)" in text
    assert "parameters:" in text and "peak memory:" in text and "free space:" in text and "(ok)" in text
    assert not (tmp_path / "out").exists()

    result = CliRunner().invoke(main, [str(recipe), "--dry-run", "--json", "-o", str(tmp_path / "out")])
    info = json.loads(result.output)
    assert info["layers"] == 6 and info["new_layers"] == [2, 5] and info["tensors"] == 6 * 9 + 3
    assert info["destination"]["enough_space"] is True
    assert info["output_bytes"] == sum(s["bytes"] for s in info["shards"])
    sd = load_state_dict(src)
    per_layer = sum(v.numel() for k, v in sd.items() if ".layers.0." in k)
    assert info["parameters"] == sum(v.numel() for v in sd.values()) + 2 * per_layer
