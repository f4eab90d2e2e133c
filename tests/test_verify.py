"""`compose verify OUT`: clean outputs verify (tensors against their sources, block expansions' logits bit for bit);
a changed value, a zeroed tensor that is not zero, a missing or an extra tensor are caught and named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from composer.cli import main
from test_depth import compose

COMPOSE = Path(sys.executable).parent / "compose"


def verify(out: Path, *args: str):
    return CliRunner().invoke(main, ["verify", str(out), *args])


def verify_json(out: Path, *args: str) -> tuple[int, dict]:
    result = verify(out, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def dus(models, write_recipe, tmp_path, name="llama", extra="", args=()):
    src = models[name]
    recipe = write_recipe(f"""
slices:
  - sources: [{{model: {src}, layer_range: [0, 3]}}]
  - sources: [{{model: {src}, layer_range: [1, 4]}}]
merge_method: passthrough
{extra}""")
    return compose(recipe, tmp_path / "out", *args)


def expansion(models, write_recipe, tmp_path, name="llama"):
    return compose(write_recipe(f"block_expansion: {{model: {models[name]}, every: 2}}\n"), tmp_path / "out")


def rewrite(out: Path, change) -> str:
    """Rewrite the output's single shard after `change(state)`, as a tamperer with safetensors would."""
    shard = out / "model.safetensors"
    state = load_file(str(shard))
    change(state)
    save_file(state, str(shard), metadata={"format": "pt"})
    return shard.name


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_clean_depth_upscale_verifies(models, write_recipe, tmp_path, name):
    out = dus(models, write_recipe, tmp_path, name)
    result = verify(out)
    assert result.exit_code == 0, result.output
    assert "result:      OK" in result.stdout
    assert "logits:      not applicable" in result.stdout
    code, report = verify_json(out)
    tensors = report["tensors"]
    assert code == 0 and report["ok"] and report["operation"] == "depth-upscaling"
    assert tensors["checked"] == tensors["copied_equal"] == tensors["in_output"] == tensors["in_provenance"]
    assert tensors["mismatches"] == 0 and tensors["missing"] == [] and tensors["extra"] == []


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_clean_block_expansion_verifies_with_identical_logits(models, write_recipe, tmp_path, name):
    out = expansion(models, write_recipe, tmp_path, name)
    result = verify(out)
    assert result.exit_code == 0, result.output
    assert "logits:      identical (torch.equal) on 8 probe tokens, float32 on cpu" in result.stdout
    code, report = verify_json(out, "--max-tokens", "5")
    assert code == 0 and report["ok"]
    assert report["new_layers"] == [2, 5]
    assert report["tensors"]["zeroed"] == 4  # o_proj and down_proj of two new layers
    assert report["tensors"]["copied_equal"] == report["tensors"]["checked"] - 4
    assert report["logits"]["result"] == "identical" and len(report["logits"]["tokens"]) == 5


def test_scale_zeroed_expansion_and_conversions_verify(models, write_recipe, tmp_path):
    """mergekit's LLaMA Pro recipe (scale 0.0, which keeps the sign of zero) verifies with identical logits; a
    gradient scale through float16 into bfloat16 is re-derived bit for bit."""
    src = models["llama"]
    zero = "parameters: {scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: 0.0}, {value: 1.0}]}"
    out = compose(write_recipe(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {src}, layer_range: [0, 2]}}]
  - sources: [{{model: {src}, layer_range: [1, 2], {zero}}}]
  - sources: [{{model: {src}, layer_range: [2, 4]}}]
"""), tmp_path / "pro")
    code, report = verify_json(out)
    assert code == 0, report
    assert report["tensors"]["zeroed"] == 2 and report["logits"]["result"] == "identical"

    scaled = compose(write_recipe(f"""
merge_method: passthrough
dtype: float16
out_dtype: bfloat16
slices:
  - sources:
      - model: {src}
        layer_range: [0, 4]
        parameters: {{scale: [{{filter: mlp, value: [1.0, 0.5]}}, {{value: 1.0}}]}}
"""), tmp_path / "scaled")
    code, report = verify_json(scaled)
    tensors = report["tensors"]
    assert code == 0, report
    assert tensors["scaled"] > 0 and tensors["converted_equal"] > 0 and tensors["via"] == "float16"
    assert tensors["scaled"] + tensors["converted_equal"] == tensors["checked"]


def test_merge_is_checked_but_not_rederived(models, write_recipe, tmp_path):
    """A merge's values are not recomputed: shape, dtype and finiteness are checked, and the report says so."""
    out = compose(write_recipe(f"""
merge_method: linear
models:
  - {{model: {models['llama']}, parameters: {{weight: 0.5}}}}
  - {{model: {models['llama-b']}, parameters: {{weight: 0.5}}}}
"""), tmp_path / "out")
    result = verify(out)
    assert result.exit_code == 0, result.output
    assert "not re-derived: " in result.stdout and "merged (linear): shape, dtype and finite values checked" \
        in result.stdout
    code, report = verify_json(out)
    assert code == 0 and report["tensors"]["not_rederived"] == report["tensors"]["checked"] > 0
    assert report["tensors"]["copied_equal"] == 0

    def change(state):
        state["model.norm.weight"][0] = float("nan")

    rewrite(out, change)
    code, report = verify_json(out)
    assert code == 1 and report["tensors"]["mismatch_list"][0]["tensor"] == "model.norm.weight"
    assert "not finite" in report["tensors"]["mismatch_list"][0]["detail"]


def test_changed_value_in_a_copied_tensor_is_caught(models, write_recipe, tmp_path):
    out = dus(models, write_recipe, tmp_path)
    name = "model.layers.4.mlp.up_proj.weight"

    def change(state):
        state[name][3, 7] += 1.0

    rewrite(out, change)
    result = verify(out)
    assert result.exit_code == 1, result.output
    assert f"{name}: element {3 * load_file(str(out / 'model.safetensors'))[name].shape[1] + 7} is" in result.stdout
    assert "result:      FAILED (1 mismatched)" in result.stdout
    code, report = verify_json(out)
    assert code == 1 and not report["ok"]
    assert report["tensors"]["mismatches"] == 1
    assert [m["tensor"] for m in report["tensors"]["mismatch_list"]] == [name]
    assert report["tensors"]["copied_equal"] == report["tensors"]["checked"] - 1


def test_zeroed_tensor_that_is_not_zero_is_caught(models, write_recipe, tmp_path):
    out = expansion(models, write_recipe, tmp_path)
    name = "model.layers.2.mlp.down_proj.weight"

    def change(state):
        state[name][0, 0] = 0.25

    rewrite(out, change)
    result = verify(out, "--skip-logits")
    assert result.exit_code == 1, result.output
    assert f"{name}: zeroed, but element 0 is 0.25" in result.stdout
    code, report = verify_json(out)  # with the logits check, which sees the change too
    assert code == 1 and report["tensors"]["zeroed"] == 3
    assert report["tensors"]["mismatch_list"][0]["tensor"] == name
    assert report["logits"]["result"] == "differ" and not report["logits"]["ok"]


def test_missing_tensor_is_caught(models, write_recipe, tmp_path):
    out = dus(models, write_recipe, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite(out, lambda state: state.pop(name))
    result = verify(out)
    assert result.exit_code == 1, result.output
    assert "missing (in the provenance, not in the shards):" in result.stdout and f"    {name}" in result.stdout
    code, report = verify_json(out)
    assert code == 1 and report["tensors"]["missing"] == [name] and report["tensors"]["mismatches"] == 0


def test_extra_tensor_is_caught(models, write_recipe, tmp_path):
    out = dus(models, write_recipe, tmp_path)
    rewrite(out, lambda state: state.update({"model.layers.9.extra.weight": torch.ones(2)}))
    code, report = verify_json(out)
    assert code == 1 and report["tensors"]["extra"] == ["model.layers.9.extra.weight"]


def test_tampered_sharded_output_is_caught(models, write_recipe, tmp_path):
    """A sharded output: a value changed in one shard, found through the index."""
    out = dus(models, write_recipe, tmp_path, "mistral", args=("--shard-size", "100KB"))
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert verify(out).exit_code == 0
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.self_attn.q_proj.weight"
    shard = out / weight_map[name]
    state = load_file(str(shard))
    state[name][0, 1] = -state[name][0, 1]
    save_file(state, str(shard), metadata={"format": "pt"})
    code, report = verify_json(out)
    assert code == 1 and [m["tensor"] for m in report["tensors"]["mismatch_list"]] == [name]


def test_folder_without_provenance_is_a_one_line_error(tmp_path, models):
    for folder in (tmp_path, models["llama"]):
        proc = subprocess.run([str(COMPOSE), "verify", str(folder)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert "has no composer_provenance.json" in lines[0] and "compose RECIPE -o OUT" in lines[0]
    result = verify(tmp_path / "nowhere")
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_console_script_verifies_and_recipe_path_still_composes(models, write_recipe, tmp_path):
    """The installed `compose` runs both: a recipe path composes as before, `compose verify OUT` checks it."""
    recipe = write_recipe(f"block_expansion: {{model: {models['llama']}, num_layers: 6}}\n")
    out = tmp_path / "out"
    made = subprocess.run([str(COMPOSE), str(recipe), "-o", str(out), "-q"], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([str(COMPOSE), "verify", str(out), "--json", "--max-tokens", "3"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["logits"]["result"] == "identical" and len(report["logits"]["tokens"]) == 3
    assert "compose verify" in subprocess.run([str(COMPOSE), "--help"], capture_output=True, text=True).stdout


def test_sources_found_with_model_override(models, write_recipe, tmp_path):
    """A source moved since composing: verify says how to name it, and --model NAME=PATH finds it."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(models["llama"], src)
    out = compose(write_recipe(f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 4]}}]\n"
                               "merge_method: passthrough\n"), tmp_path / "out")
    moved = tmp_path / "moved"
    src.rename(moved)
    result = verify(out)
    assert result.exit_code == 2 and f"--model {src}=PATH" in result.output
    result = verify(out, "--model", f"{src}={moved}")
    assert result.exit_code == 0, result.output


def test_models_relative_to_the_recipe_folder_are_found(models, tmp_path, monkeypatch):
    """compose looks for a relative model name from the current folder, then from the recipe's folder; verify,
    run from elsewhere, with the output in a third folder, finds the model where compose did."""
    import shutil

    recipes = tmp_path / "recipes"
    shutil.copytree(models["llama"], recipes / "weights" / "llama")
    recipe = recipes / "dus.yaml"
    recipe.write_text("slices:\n  - sources: [{model: weights/llama, layer_range: [0, 3]}]\n"
                      "  - sources: [{model: weights/llama, layer_range: [1, 4]}]\nmerge_method: passthrough\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = compose(recipe, tmp_path / "outputs" / "out")
    # recorded because the model was found there (not from the current folder): otherwise nothing is recorded
    assert json.loads((out / "composer_provenance.json").read_text())["recipe_folder"] == str(recipes.resolve())
    code, report = verify_json(out)
    assert code == 0 and report["ok"], report
    (recipes / "weights" / "llama").rename(recipes / "weights" / "moved")  # gone from where compose found it
    result = verify(out)
    assert result.exit_code != 0 and "weights/llama" in result.output and "recipe's folder" in result.output, (
        result.output)
