"""Every bad input gets one clean line naming the problem and the fix, a non-zero exit, and no traceback."""
from __future__ import annotations

import os
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from composer.cli import main
from conftest import tree_digest
from tinymodels import load_state_dict

COMPOSE = [sys.executable, "-m", "composer.cli"]


def fails(recipe: Path, *args: str, out: Path | None = None) -> str:
    """Run the real CLI in a subprocess; assert a clean one-line failure; return the line."""
    cmd = [*COMPOSE, str(recipe), *args, *(["-o", str(out)] if out else ["--dry-run"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def passthrough(model, rng="[0, 4]") -> str:
    return f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: {rng}\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: M\n        layer_rnage: [0, 2]\n",
     "recipe.yaml:5: slices[0].sources[0].layer_rnage: unknown key 'layer_rnage'; did you mean 'layer_range'?"),
    ("dtpye: bfloat16\n" + "block_expansion: {model: M, every: 2}\n",
     "recipe.yaml:1: dtpye: unknown key 'dtpye'; did you mean 'dtype'?"),
    ("merge_method: pasthrough\nmodels: [{model: M}]\n",
     "recipe.yaml:1: merge_method: unknown merge_method 'pasthrough'; did you mean 'passthrough'?"),
    ("merge_method: goliath\nmodels: [{model: M}]\n", "merge_method 'goliath' is not supported yet"),
    (passthrough("M", "[4, 0]"), "recipe.yaml:5: slices[0].sources[0].layer_range: layer_range [4, 0] is empty or reversed"),
    (passthrough("M", "[0, 40]"), "slices[0]: layer_range [0, 40] is out of range for 'M', which has 4 layers: use an end of at most 4"),
    (passthrough("does/not-exist"), "model 'does/not-exist' not found"),
    (passthrough("./nowhere"), "model './nowhere' not found (no folder nowhere): check the path"),
    ("merge_method: passthrough\nmodels: [{model: M, parameters: {t: 0.5}}]\n",
     "unknown parameter 't' for merge_method passthrough (it takes: scale)"),
    ("merge_method: passthrough\nmodels: [{model: M, parameters: {scael: 0.5}}]\n", "did you mean 'scale'?"),
    ("dtype: bf32\nblock_expansion: {model: M, every: 2}\n", "unknown dtype 'bf32'"),
    ("block_expansion: {model: M, every: 2}\n" + passthrough("M"), "give exactly one of slices, models, block_expansion or interleave"),
    ("block_expansion: {model: M, every: 2, num_layers: 6}\n", "give exactly one of num_layers"),
    ("block_expansion: {model: M, num_layers: 7}\n", "block_expansion num_layers=7 cannot be placed evenly in 4 layers: use 6 (a copy every 2) or 8 (a copy every 1)"),
    ("merge_method: passthrough\nslices: [{sources: [{model: M, layer_range: [0, 2]}]}\n", "not valid YAML"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ("merge_method: passthrough\nmodels: [{model: M, parameters: {scale: yes}}]\n", "parameter scale for"),
    ("parameters: {scale: 0.5}\nblock_expansion: {model: M, every: 2}\n", "parameters do not apply to block_expansion"),
    ("base_model: other\nblock_expansion: {model: M, every: 2}\n", "block_expansion takes its config from"),
])
def test_bad_recipes(models, tmp_path, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace(" M", f" {models['llama']}").replace("'M'", f"'{models['llama']}'"))
    assert expected.replace("'M'", f"'{models['llama']}'") in fails(recipe)


def test_hub_id_without_local_copy_says_how(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(passthrough("mistralai/Mistral-7B-v0.1"))
    line = fails(recipe)
    assert "--model mistralai/Mistral-7B-v0.1=/path/to/local/copy" in line


def broken_copy(models, tmp_path, name="llama") -> Path:
    dst = tmp_path / f"broken-{name}"
    shutil.copytree(models[name], dst)
    return dst


def test_truncated_file(models, tmp_path):
    src = broken_copy(models, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    (tmp_path / "r.yaml").write_text(passthrough(src))
    assert "the file is truncated, re-download it" in fails(tmp_path / "r.yaml")


def test_bad_header_length_and_json(models, tmp_path):
    src = broken_copy(models, tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    (tmp_path / "r.yaml").write_text(passthrough(src))
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    assert "corrupt safetensors header" in fails(tmp_path / "r.yaml")
    n = struct.unpack("<Q", data[:8])[0]
    f.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    assert "not JSON" in fails(tmp_path / "r.yaml")


def test_bad_offsets(models, tmp_path):
    src = broken_copy(models, tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    (tmp_path / "r.yaml").write_text(passthrough(src))
    line = fails(tmp_path / "r.yaml")
    assert f"tensor '{name}' has bad data_offsets" in line and str(f) in line


def test_index_names_missing_shard(models, tmp_path):
    src = broken_copy(models, tmp_path, "mistral")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    (tmp_path / "r.yaml").write_text(passthrough(src))
    assert f"names shard '{shard.name}', which is missing" in fails(tmp_path / "r.yaml")


def test_missing_tensor(models, tmp_path):
    src = broken_copy(models, tmp_path, "mistral")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "r.yaml").write_text(passthrough(src))
    assert "tensor 'model.layers.9.mlp.up_proj.weight' is not in its shard" in fails(tmp_path / "r.yaml")


def test_layer_missing_a_tensor(models, tmp_path):
    from safetensors.torch import save_file

    src = broken_copy(models, tmp_path)
    sd = load_state_dict(src)
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "r.yaml").write_text(passthrough(src))
    assert "layer 2 does not have the base model's tensors (differs in: mlp.up_proj.weight)" in fails(tmp_path / "r.yaml")


def test_shape_mismatch(models, tmp_path):
    from tinymodels import make_checkpoint

    narrow = make_checkpoint(tmp_path / "narrow", "llama", hidden_size=32, num_heads=2, num_kv_heads=1)
    (tmp_path / "r.yaml").write_text(f"interleave: {{models: [{models['llama']}, {narrow}], window: 2}}\n")
    line = fails(tmp_path / "r.yaml")
    assert "shape mismatch" in line and "needs [" in line


def test_unverified_architecture_refused_for_block_expansion(models, tmp_path):
    src = broken_copy(models, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MptForCausalLM"], "mpt"  # a family outside the table
    (src / "config.json").write_text(json.dumps(config))
    (tmp_path / "r.yaml").write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    line = fails(tmp_path / "r.yaml")
    assert "proven for Llama, Mistral, Qwen2" in line and "not for MptForCausalLM" in line


def test_destination_rules(models, tmp_path):
    src = models["llama"]
    before = tree_digest(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "is not empty: pass --overwrite to replace it" in fails(recipe, out=out)
    assert (out / "keep.txt").exists()
    assert "is inside source model" in fails(recipe, out=src / "sub")
    assert "is inside source model" in fails(recipe, "--overwrite", out=src)
    assert "is inside destination" in fails(recipe, "--overwrite", out=src.parent)
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_usage_errors_are_one_line(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {models['llama']}, every: 2}}\n")
    proc = subprocess.run([*COMPOSE, str(recipe), "--shard-size", "lots"], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a size" in proc.stderr and "Traceback" not in proc.stderr
    assert "recipe file not found" in fails(tmp_path / "missing.yaml")


SLOW = """
import sys, time
import composer.execute
ex = sys.modules["composer.execute"]
ex.CHUNK_BYTES = 8192
real = ex._write_chunk
def slow(*a):
    time.sleep(0.02)
    return real(*a)
ex._write_chunk = slow
from composer.cli import main
main()
"""


def _finished_looking(folder: Path) -> list[str]:
    """Every folder beside the output that holds model files; finished or not, it must not exist."""
    return [str(p) for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors"))
            and (p / "config.json").exists()]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_run_leaves_no_model(models, tmp_path, sig):
    src = models["mistral"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 1}}\n")
    dest_parent = tmp_path / "outs"
    dest_parent.mkdir()
    out = dest_parent / "model"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(recipe), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(dest_parent.glob(".model.composer-partial-*/*.safetensors")):
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert not out.exists()
    assert _finished_looking(dest_parent) == []
    leftovers = list(dest_parent.iterdir())
    if sig == signal.SIGKILL:
        # the partial folder, and the lock file, which no process holds any more and the next run takes over
        assert all(p.name.startswith((".model.composer-partial-", ".model.composer-lock")) for p in leftovers)
    else:
        assert leftovers == []  # a catchable signal cleans up after itself
    # the next run removes what a killed run left and finishes
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dest_parent.iterdir()) == ["model"]


def test_failure_midway_leaves_nothing(models, tmp_path, monkeypatch):
    ex = sys.modules["composer.execute"]
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args)

    real = ex._write_chunk
    monkeypatch.setattr(ex, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(ex, "_write_chunk", failing)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {models['llama']}, every: 2}}\n")
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_source_truncated_after_planning(models, tmp_path):
    """A file that changes between the plan and the copy is refused by name when opened, and nothing is left."""
    from composer import CorruptFileError, execute, plan_recipe

    src = broken_copy(models, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    plan = plan_recipe(recipe)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(CorruptFileError, match=r"model.safetensors changed since the plan was made"):
        execute(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


KILL_AT = """
import os, signal, sys
import composer.execute
ex = sys.modules["composer.execute"]
ex.CHUNK_BYTES = 8192
limit = float(os.environ["COMPOSER_TEST_KILL_AT"]) * int(os.environ["COMPOSER_TEST_TOTAL"])
real, filled = ex._write_chunk, [0]
def counting(*a):
    filled[0] += ex.CHUNK_BYTES
    if filled[0] >= limit:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup of any kind runs
    return real(*a)
ex._write_chunk = counting
from composer.cli import main
main()
"""


@pytest.mark.parametrize("at", [0.1, 0.5, 0.9])
def test_kill_9_at_a_fraction_of_the_bytes_then_rerun_gives_a_clean_runs_bytes(models, tmp_path, at):
    """kill -9 after 10%, 50% or 90% of the output's bytes are filled: nothing finished-looking is left, and a
    rerun writes exactly the bytes of a run that was never interrupted."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nparameters: {{weight: 0.5}}\nbase_model: {models['mistral']}\n"
                      f"models: [{{model: {models['mistral']}}}, {{model: {models['mistral-b']}}}]\n")
    clean = tmp_path / "clean"
    assert CliRunner().invoke(main, [str(recipe), "-o", str(clean), "-q", "--shard-size", "200KB"]).exit_code == 0
    total = sum(p.stat().st_size for p in clean.glob("*.safetensors"))
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "model"
    env = {**os.environ, "COMPOSER_TEST_KILL_AT": str(at), "COMPOSER_TEST_TOTAL": str(total)}
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(recipe), "-o", str(out), "-q", "--shard-size", "200KB"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and _finished_looking(outs) == []
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--shard-size", "200KB"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in outs.iterdir()) == ["model"]
    files = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files and len(list(clean.glob("*.safetensors"))) > 1
    for name in files:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
