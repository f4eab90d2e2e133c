"""Multi-document recipes: stages run in order, a later one uses an earlier one's output by name, reruns skip
finished stages."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from click.testing import CliRunner

import reference
from composer.cli import main
from composer.methods import METHODS
from tinymodels import load_state_dict, logits


def two_stages(a, b) -> str:
    return f"""name: average
merge_method: linear
dtype: float32
parameters: {{weight: 0.5}}
models: [{{model: {a}}}, {{model: {b}}}]
---
# then grow the average LLaMA-Pro style
block_expansion: {{model: average, every: 2}}
"""


def test_later_stage_uses_earlier_output(models, write_recipe, tmp_path):
    a, b = models["llama"], models["llama-b"]
    recipe = write_recipe(two_stages(a, b))
    out = tmp_path / "final"
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    sa, sb = load_state_dict(a), load_state_dict(b)
    average = {k: METHODS["linear"].apply([sa[k], sb[k]], per_input={"weight": [0.5, 0.5]}) for k in sa}
    reference.assert_same_tensors(load_state_dict(tmp_path / "final.stages" / "average"), average)
    reference.assert_same_tensors(load_state_dict(out), reference.llama_pro(average, 4, 6))
    assert torch.equal(logits(tmp_path / "final.stages" / "average"), logits(out))
    # the output's recipe file and card hold the whole recipe, and the card lists every stage's operation
    assert (out / "composer_recipe.yaml").read_text() == recipe.read_text()
    card = (out / "README.md").read_text()
    assert "| 1 | `average` | linear |" in card and "| 2 | this model | block-expansion |" in card
    assert "name: average" in card and "block_expansion: {model: average, every: 2}" in card
    rerun = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--overwrite"])  # stage reused: still listed
    assert rerun.exit_code == 0 and "| 1 | `average` | linear |" in (out / "README.md").read_text()
    assert json.loads((out / "composer_provenance.json").read_text())["new_layers"] == [2, 5]


def test_rerun_skips_finished_stages(models, write_recipe, tmp_path):
    a, b = models["llama"], models["llama-b"]
    recipe = write_recipe(two_stages(a, b))
    out = tmp_path / "final"
    cmd = [sys.executable, "-m", "composer.cli", str(recipe), "-o", str(out), "-q"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    first = (out / "model.safetensors").read_bytes()
    stage_file = tmp_path / "final.stages" / "average" / "model.safetensors"
    stamp = stage_file.stat().st_mtime_ns
    again = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "stage average: already built" in again.stderr
    assert stage_file.stat().st_mtime_ns == stamp
    assert (out / "model.safetensors").read_bytes() == first
    # a changed stage is rebuilt
    recipe.write_text(two_stages(a, b).replace("dtype: float32", "dtype: bfloat16"))
    changed = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True)
    assert changed.returncode == 0 and "already built" not in changed.stderr
    assert (out / "model.safetensors").read_bytes() != first


def test_dry_run_plans_every_stage_without_writing(models, write_recipe, tmp_path):
    recipe = write_recipe(two_stages(models["llama"], models["llama-b"]))
    result = CliRunner().invoke(main, [str(recipe), "--dry-run", "-o", str(tmp_path / "final")])
    assert result.exit_code == 0, result.output
    assert "== stage average" in result.output and "average (4) -> 6" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    info = json.loads(CliRunner().invoke(main, [str(recipe), "--dry-run", "--json"]).output)
    assert [s.get("stage") for s in info["stages"]] == ["average", None]
    assert info["stages"][1]["layers"] == 6


def test_unnamed_intermediate_stage_is_refused(models, write_recipe):
    recipe = write_recipe(two_stages(models["llama"], models["llama-b"]).replace("name: average\n", ""))
    result = CliRunner().invoke(main, [str(recipe), "--dry-run"])
    assert result.exit_code == 1
    assert "every document of a multi-document recipe but the last needs a name" in result.output


def test_a_stage_is_reused_only_when_nothing_its_bytes_depend_on_changed(models, write_recipe, tmp_path):
    """A rerun reuses a finished stage only when its fingerprint (document, resolved inputs, --seed, --shard-size,
    composer's version) is unchanged, and says why it rebuilds one; --rebuild builds it again regardless."""
    import os
    import shutil

    a = tmp_path / "a"
    shutil.copytree(models["llama"], a)
    b = models["llama-b"]
    recipe = write_recipe(f"""name: dropped
merge_method: dare_linear
base_model: {a}
dtype: float32
models: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}]
---
block_expansion: {{model: dropped, every: 2}}
""")
    out = tmp_path / "final"
    stage = tmp_path / "final.stages" / "dropped" / "model.safetensors"

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "composer.cli", str(recipe), "-o", str(out), "-q", "--overwrite",
                               *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done

    run("--seed", "1")
    seed1 = stage.read_bytes()
    assert "already built" in run("--seed", "1").stderr
    second = run("--seed", "2")  # DARE's masks depend on the seed: --seed 2 must not return --seed 1's bytes
    assert "stage dropped: rebuilding" in second.stderr and "--seed changed" in second.stderr
    assert stage.read_bytes() != seed1
    seed2 = stage.read_bytes()
    weights = next(a.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # an input replaced
    third = run("--seed", "2")
    assert f"input '{a}' changed (its files' sizes or modification times)" in third.stderr
    assert stage.read_bytes() == seed2  # same bytes in, same bytes out
    assert "already built" in run("--seed", "2").stderr
    assert "rebuilding" in run("--seed", "2", "--rebuild").stderr
    assert "--shard-size changed" in run("--seed", "2", "--shard-size", "2GB").stderr
