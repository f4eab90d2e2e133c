"""Streamed outputs equal naive in-memory references, tensor for tensor, for every depth operation."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

import reference
from composer.cli import main
from conftest import tree_digest
from tinymodels import load_state_dict, logits, make_checkpoint


def compose(recipe, out, *args):
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen2-single"])
def test_depth_upscaling_equals_reference(models, write_recipe, tmp_path, name):
    src = models[name]
    before = tree_digest(src)
    recipe = write_recipe(f"""
slices:
  - sources: [{{model: {src}, layer_range: [0, 3]}}]
  - sources: [{{model: {src}, layer_range: [1, 4]}}]
merge_method: passthrough
""")
    out = compose(recipe, tmp_path / "out")
    reference.assert_same_tensors(load_state_dict(out), reference.dus(load_state_dict(src), [(0, 3), (1, 4)]))
    assert tree_digest(src) == before
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    logits(out)  # loads in transformers with no edits


@pytest.mark.parametrize(("extra", "loaded"), [("", False), ("dtype: float16\n", True)])
def test_torch_is_imported_only_when_a_tensor_is_computed(models, write_recipe, tmp_path, extra, loaded):
    """Byte copies need no torch: a depth up-scale runs without importing it (1-3 s and ~0.2 GB spared) and gives
    the reference's tensors; a dtype change computes every tensor, so it loads torch."""
    import subprocess

    src = models["llama"]
    recipe = write_recipe(f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 3]}}]\n"
                          f"  - sources: [{{model: {src}, layer_range: [1, 4]}}]\nmerge_method: passthrough\n{extra}")
    out = tmp_path / "out"
    script = ("import sys\nfrom composer.cli import main\n"
              f"main([{str(recipe)!r}, '-o', {str(out)!r}, '--quiet'], standalone_mode=False)\n"
              "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ("torch loaded" if loaded else "torch not loaded")
    expected = reference.dus(load_state_dict(src), [(0, 3), (1, 4)])
    if loaded:
        expected = {k: v.to(torch.float16) for k, v in expected.items()}
    reference.assert_same_tensors(load_state_dict(out), expected)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen2-single"])
@pytest.mark.parametrize("target", [6, 8, 5])
def test_block_expansion_equals_llama_pro(models, write_recipe, tmp_path, name, target):
    src = models[name]
    recipe = write_recipe(f"block_expansion: {{model: {src}, num_layers: {target}}}\n")
    out = compose(recipe, tmp_path / "out")
    expected = reference.llama_pro(load_state_dict(src), 4, target)
    reference.assert_same_tensors(load_state_dict(out), expected)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_block_expansion_keeps_logits_bit_for_bit(models, write_recipe, tmp_path, name):
    src = models[name]
    out = compose(write_recipe(f"block_expansion: {{model: {src}, every: 2}}\n"), tmp_path / "out")
    before, after = logits(src), logits(out)
    assert torch.equal(before, after)
    sd_src, sd_out = load_state_dict(src), load_state_dict(out)
    provenance = json.loads((out / "composer_provenance.json").read_text())
    assert provenance["new_layers"] == [2, 5]
    for new, copied_from in ((2, 1), (5, 3)):
        inserted = {k: v for k, v in sd_out.items() if f"layers.{new}." in k}
        assert inserted
        for key, value in inserted.items():
            source = sd_src[key.replace(f"layers.{new}.", f"layers.{copied_from}.")]
            if "o_proj" in key or "down_proj" in key:
                assert torch.count_nonzero(value) == 0 and not torch.signbit(value).any(), key
            else:
                assert torch.equal(value, source), key


def test_block_expansion_zeroes_output_biases_too(tmp_path, write_recipe):
    """Llama with attention and MLP biases: o_proj.bias and down_proj.bias are zeroed with their weights."""
    src = make_checkpoint(tmp_path / "biased", "llama", attention_bias=True, mlp_bias=True)
    assert "model.layers.0.self_attn.o_proj.bias" in load_state_dict(src)
    out = compose(write_recipe(f"block_expansion: {{model: {src}, every: 2}}\n"), tmp_path / "out")
    sd = load_state_dict(out)
    for layer in (2, 5):
        for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert torch.count_nonzero(sd[f"model.layers.{layer}.{name}"]) == 0
        assert torch.count_nonzero(sd[f"model.layers.{layer}.self_attn.q_proj.bias"]) > 0
    assert torch.equal(logits(src), logits(out))


def test_every_and_num_layers_agree(models, write_recipe, tmp_path):
    src = models["llama"]
    a = compose(write_recipe(f"block_expansion: {{model: {src}, every: 2}}\n", "a.yaml"), tmp_path / "a")
    b = compose(write_recipe(f"block_expansion: {{model: {src}, num_layers: 6}}\n", "b.yaml"), tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_interleave_equals_reference(models, write_recipe, tmp_path):
    a, b = models["llama"], models["llama-b"]
    recipe = write_recipe(f"interleave: {{models: [{a}, {b}], window: 2, overlap: 1}}\n")
    out = compose(recipe, tmp_path / "out")
    expected = reference.interleave([load_state_dict(a), load_state_dict(b)], 4, 2, 1)
    reference.assert_same_tensors(load_state_dict(out), expected)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    logits(out)


def test_mergekit_scale_recipe_equals_reference(models, write_recipe, tmp_path):
    """LLaMA Pro as mergekit users write it: passthrough slices, `scale` filters zeroing o_proj and down_proj."""
    src = models["mistral"]
    zero = "parameters: {scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: 0.0}, {value: 1.0}]}"
    recipe = write_recipe(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {src}, layer_range: [0, 2]}}]
  - sources: [{{model: {src}, layer_range: [1, 2], {zero}}}]
  - sources: [{{model: {src}, layer_range: [2, 4]}}]
  - sources: [{{model: {src}, layer_range: [3, 4], {zero}}}]
""")
    out = compose(recipe, tmp_path / "out")
    sd = load_state_dict(src)
    expected = reference.llama_pro(sd, 4, 6)
    actual = load_state_dict(out)
    for k, v in expected.items():  # x * 0.0 keeps the sign of zero, as mergekit's does: compare values
        if "o_proj" in k or "down_proj" in k:
            expected[k] = v * 0.0 if "layers.2." in k or "layers.5." in k else v
    reference.assert_same_tensors(actual, expected)
    assert torch.equal(logits(src), logits(out))
    assert json.loads((out / "composer_provenance.json").read_text())["new_layers"] == [2, 5]


def test_scale_gradient_and_dtype_conversion(models, write_recipe, tmp_path):
    """A gradient scale is interpolated across a slice's layers; values round through `dtype`, then `out_dtype`."""
    src = models["llama"]
    recipe = write_recipe(f"""
merge_method: passthrough
dtype: float16
out_dtype: bfloat16
slices:
  - sources:
      - model: {src}
        layer_range: [0, 4]
        parameters: {{scale: [{{filter: mlp, value: [1.0, 0.5]}}, {{value: 2.0}}]}}
""")
    out = compose(recipe, tmp_path / "out")
    sd, actual = load_state_dict(src), load_state_dict(out)
    for name, value in sd.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if "mlp" in name:
            scale = 1.0 - 0.5 * layer / 3
        else:
            scale = 2.0
        expected = (value.to(torch.float16) * scale).to(torch.bfloat16)
        assert torch.equal(actual[name], expected), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_conversion_is_chunked_and_exact(models, write_recipe, tmp_path, monkeypatch, dtype):
    """Tiny chunks split tensors across output chunks and compute steps; the result equals a whole-tensor cast."""
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_BYTES", 3 * 4096)  # chunks split tensors too
    src = models["llama-bf16"]
    recipe = write_recipe(f"merge_method: passthrough\nout_dtype: {dtype}\nmodels: [{{model: {src}}}]\n")
    out = compose(recipe, tmp_path / "out")
    target = getattr(torch, dtype)
    expected = {k: v.to(target) for k, v in load_state_dict(src).items()}
    reference.assert_same_tensors(load_state_dict(out), expected)


def test_sharded_output_and_index(models, write_recipe, tmp_path):
    src = models["llama"]
    out = compose(write_recipe(f"block_expansion: {{model: {src}, every: 1}}\n"), tmp_path / "out",
                  "--shard-size", "200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).stat().st_size <= 200_000 + 4096 for s in shards)
    assert not (out / "model.safetensors").exists()
    reference.assert_same_tensors(load_state_dict(out), reference.llama_pro(load_state_dict(src), 4, 8))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in load_state_dict(out).values())
