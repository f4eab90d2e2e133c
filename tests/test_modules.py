"""mergekit's `modules:` for multimodal checkpoints, on a tiny Gemma 3 (text decoder, SigLIP vision tower,
projector) that transformers itself built and saved: each module has its own slices or models, the output's
sub-configs follow, the tensors outside the recipe's modules are the base's, and the output loads as Gemma 3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from test_depth import compose
from tinymodels import load_state_dict, save_random

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, sliding_window=8, max_position_embeddings=128, bos_token_id=1,
            eos_token_id=2, pad_token_id=3)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def gemma3(path: Path, seed: int) -> Path:
    config = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                       image_token_index=255, boi_token_index=253, eoi_token_index=254)
    return save_random(path, lambda: transformers.Gemma3ForConditionalGeneration(config), seed)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    return gemma3(root / "a", 0), gemma3(root / "b", 1)


def _load(out: Path):
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 17, 42, 99, 5]]))  # text only: the decoder runs
    return model


def test_depth_upscaling_the_text_decoder_leaves_the_vision_tower_alone(vlm, write_recipe, tmp_path):
    a, _ = vlm
    recipe = write_recipe(f"""\
merge_method: passthrough
base_model: {a}
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 3]}}]
      - sources: [{{model: {a}, layer_range: [1, 4]}}]
  vision_tower:
    models: [{{model: {a}}}]
""")
    out = compose(recipe, tmp_path / "out")
    src, got = load_state_dict(a), load_state_dict(out)
    layer = "language_model.model.layers."
    expected = {n: t for n, t in src.items() if not n.startswith(layer)}  # vision, projector, embeddings, norm
    for i, j in enumerate((0, 1, 2, 1, 2, 3)):
        expected.update({f"{layer}{i}.{n[len(f'{layer}{j}.'):]}": t for n, t in src.items()
                         if n.startswith(f"{layer}{j}.")})
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((a / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["text_config"]["layer_types"] == [source["text_config"]["layer_types"][j] for j in (0, 1, 2, 1, 2, 3)]
    assert config["vision_config"] == source["vision_config"]
    assert type(_load(out)).__name__ == "Gemma3ForConditionalGeneration"


def test_a_merged_text_decoder_with_the_base_vision_tower_and_projector(vlm, write_recipe, tmp_path):
    a, b = vlm
    recipe = write_recipe(f"""\
merge_method: linear
base_model: {a}
dtype: float32
modules:
  text_decoder:
    models:
      - {{model: {a}, parameters: {{weight: 0.3}}}}
      - {{model: {b}, parameters: {{weight: 0.7}}}}
""")
    out = compose(recipe, tmp_path / "out")
    xa, xb, got = load_state_dict(a), load_state_dict(b), load_state_dict(out)
    w = torch.tensor([0.3, 0.7])
    assert sorted(got) == sorted(xa)
    for name, x in xa.items():
        if name.startswith("language_model."):
            expected = torch.zeros_like(x).addcmul_(x, w[0]).addcmul_(xb[name], w[1]) / w.sum()
        else:  # outside the recipe's modules: the base's tensor, untouched
            expected = x
        assert torch.equal(got[name], expected), name
    _load(out)


def test_modules_refusals(vlm, write_recipe, tmp_path):
    from test_errors import fails

    a, _ = vlm
    assert "write the recipe with modules: (text_decoder, vision_tower, multi_modal_projector)" in fails(write_recipe(
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 4]}}]\n"))
    line = fails(write_recipe(f"merge_method: passthrough\nbase_model: {a}\nmodules:\n  text_decoda:\n"
                              f"    models: [{{model: {a}}}]\n"))
    assert "has no module 'text_decoda'" in line and "did you mean 'text_decoder'" in line
    line = fails(write_recipe(f"merge_method: passthrough\nmodules:\n  text_decoder:\n    models: [{{model: {a}}}]\n"))
    assert "needs base_model" in line


def test_a_module_s_parameters_win_over_the_global_ones(vlm, write_recipe, tmp_path):
    a, b = vlm
    recipe = write_recipe(f"""\
merge_method: linear
base_model: {a}
dtype: float32
parameters: {{normalize: true}}
modules:
  text_decoder:
    parameters: {{normalize: false}}
    models:
      - {{model: {a}, parameters: {{weight: 0.6}}}}
      - {{model: {b}, parameters: {{weight: 0.8}}}}
""")
    got = load_state_dict(compose(recipe, tmp_path / "out"))
    xa, xb = load_state_dict(a), load_state_dict(b)
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    w = torch.tensor([0.6, 0.8])
    assert torch.equal(got[name], torch.zeros_like(xa[name]).addcmul_(xa[name], w[0]).addcmul_(xb[name], w[1]))
