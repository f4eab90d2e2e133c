"""Hostile and broken inputs: each is refused with one line naming the problem and the fix, quickly, with no
traceback, nothing finished-looking in the output and the inputs unchanged."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from composer.cli import main
from conftest import tree_digest
from test_errors import COMPOSE, fails, passthrough


def refused(tmp_path, text: str, *args: str, seconds: float = 20) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    start = time.monotonic()
    line = fails(recipe, *args)
    assert time.monotonic() - start < seconds, "refused, but slowly"
    return line


# -- 1-4: the recipe's YAML ------------------------------------------------------------------------------------------

def _laughs(model) -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) values once expanded, 90 in the text."""
    lines = ["merge_method: linear", f"models: [{{model: {model}}}, {{model: {model}}}]", "parameters:",
             "  weight: 0.5", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_refused_before_expanding(models, tmp_path):
    line = refused(tmp_path, _laughs(models["llama"]), seconds=10)
    assert "expands to more than 1,000,000 values (aliases included)" in line


def test_recursive_alias_refused(models, tmp_path):
    text = f"merge_method: linear\nmodels: [{{model: {models['llama']}}}]\nparameters:\n  weight: &w [1, *w]\n"
    assert "recipe.yaml:4: alias *w refers to a value that contains it" in refused(tmp_path, text)


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deep_nesting_refused_without_recursion_error(models, tmp_path, opening):
    closing = "]" if opening == "[" else "}"
    text = passthrough(models["llama"]) + "parameters: {scale: " + opening * 5000 + "1" + closing * 5000 + "}\n"
    line = refused(tmp_path, text)
    assert "recipe.yaml:6: nested more than 64 levels deep" in line and "RecursionError" not in line


def test_absurd_layer_range_refused_quickly(models, tmp_path):
    line = refused(tmp_path, passthrough(models["llama"], f"[0, {10**12}]"), seconds=10)
    assert "layer_range [0, 1000000000000] is out of range" in line and "use an end of at most 4" in line


def test_million_entry_gradient_refused_quickly(models, tmp_path):
    m = models["llama"]
    text = (f"merge_method: linear\nmodels: [{{model: {m}}}, {{model: {m}}}]\nparameters:\n  weight: ["
            + ", ".join(["0.5"] * 1_000_000) + "]\n")
    assert "recipe.yaml:4: a list with more than 10,000 entries" in refused(tmp_path, text, seconds=10)


@pytest.mark.parametrize(("text", "expected"), [
    ("1: x\n", "recipe.yaml:1: key 1 is a YAML int, not a name"),
    ("? [a]\n: x\n", "recipe.yaml:1: a key is a list, not a name"),
    ("? {a: 1}\n: x\n", "recipe.yaml:1: a key is a mapping, not a name"),
    ("null: x\n", "recipe.yaml:1: key null is a YAML null, not a name"),
    ("models: [{model: M, parameters: {true: 1}}]\n", "recipe.yaml:2: key true is a YAML bool, not a name"),
    ("", "recipe.yaml: the recipe is empty"),
    ("# nothing but a comment\n---\n", "recipe.yaml: the recipe is empty"),
    ("- merge_method: passthrough\n- models: [{model: M}]\n", "a recipe is a YAML mapping"),
])
def test_keys_that_are_not_names_and_empty_or_list_recipes(models, tmp_path, text, expected):
    body = "merge_method: passthrough\n" + text if text.startswith("models") else text
    assert expected in refused(tmp_path, body.replace(" M", f" {models['llama']}"))


# -- 5: stages that use each other -----------------------------------------------------------------------------------

def _stage(name: str | None, model: str) -> str:
    return (f"name: {name}\n" if name else "") + f"merge_method: passthrough\nmodels: [{{model: {model}}}]\n"


def test_stages_in_a_cycle_refused(models, tmp_path):
    text = "---\n".join([_stage("a", "b"), _stage("b", "a"), _stage(None, "b")])
    line = refused(tmp_path, text)
    assert "stage 'a' uses stage 'b', which comes after it" in line and "move 'b' up" in line


def test_stage_using_itself_refused(models, tmp_path):
    text = "---\n".join([_stage("a", "a"), _stage(None, "a")])
    assert "stage 'a' uses itself as a model" in refused(tmp_path, text)
    out = tmp_path / "out"
    assert "stage 'a' uses itself" in fails(tmp_path / "recipe.yaml", out=out)
    assert not out.exists() and not (tmp_path / "out.stages").exists()


# -- 6-7: safetensors headers ----------------------------------------------------------------------------------------

def _copy(models, tmp_path, name: str = "llama") -> Path:
    dst = tmp_path / f"src-{name}"
    shutil.copytree(models[name], dst)
    return dst


def _rewrite_header(file: Path, edit) -> None:
    """Replace a safetensors file's header by edit(header text) (padded back to its length if shorter)."""
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    raw = edit(data[8:8 + n].decode().rstrip()).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _refused_source(models, tmp_path, src: Path, expected: str) -> None:
    before = tree_digest(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: {src}}}, {{model: {models['llama-b']}}}]\n"
                      "parameters: {weight: 0.5}\n")
    start = time.monotonic()
    assert expected in fails(recipe, out=tmp_path / "out")
    assert time.monotonic() - start < 20
    assert not (tmp_path / "out").exists() and tree_digest(src) == before


@pytest.mark.parametrize(("length", "expected"), [
    (2**63, f"declares {2**63} header bytes"),
    (2**64 - 1, f"declares {2**64 - 1} header bytes"),
    (200 * 2**20, "at most 104857600 allowed"),  # past the bound though the file could hold it: not allocated
])
def test_header_length_never_allocated(models, tmp_path, length, expected):
    src = _copy(models, tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", length) + data[8:])
    if length == 200 * 2**20:
        with open(f, "r+b") as fh:
            fh.truncate(8 + length + 16)  # sparse: no disk space
    _refused_source(models, tmp_path, src, expected)


def test_header_longer_than_file(models, tmp_path):
    src = _copy(models, tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    _refused_source(models, tmp_path, src, f"declares {len(data)} header bytes, file has {len(data)}")


def _first_tensor(header: str) -> str:
    return next(k for k in json.loads(header) if k != "__metadata__")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda h, t: h.replace('"dtype":"F32"', '"dtype":"F33"', 1), "has a malformed header entry"),
    (lambda h, t: h.replace('"dtype":"F32"', '"dtype":7', 1), "has a malformed header entry"),
    (lambda h, t: json.dumps({**json.loads(h), t: {**json.loads(h)[t], "shape": [-4, 64]}}),
     "has a malformed header entry"),
    (lambda h, t: json.dumps({**json.loads(h), t: {**json.loads(h)[t], "shape": [2**62, 2**62]}}),
     "has bad data_offsets"),
    (lambda h, t: json.dumps({**json.loads(h), t: {**json.loads(h)[t], "shape": [True, 64]}}),
     "has a malformed header entry"),
    (lambda h, t: h[:-1] + "," + json.dumps({t: json.loads(h)[t]})[1:], "key '{t}' appears twice"),
    (lambda h, t: json.dumps({**json.loads(h), t: {**json.loads(h)[t], "data_offsets": [0, 8]}}),
     "has bad data_offsets [0, 8]"),
])
def test_malformed_header_entries(models, tmp_path, edit, expected):
    src = _copy(models, tmp_path)
    f = src / "model.safetensors"
    n = struct.unpack("<Q", f.read_bytes()[:8])[0]
    tensor = _first_tensor(f.read_bytes()[8:8 + n].decode())
    _rewrite_header(f, lambda h: edit(h, tensor))
    _refused_source(models, tmp_path, src, expected.format(t=tensor))


# -- 8: an index that points outside its folder ----------------------------------------------------------------------

def _point_index(src: Path, target: str) -> None:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_pointing_outside_folder_refused(models, tmp_path, target):
    src = _copy(models, tmp_path, "mistral")
    _point_index(src, target)
    _refused_source(models, tmp_path, src, f"names shard '{target}', a path outside the model folder")


def test_shard_symlink_leaving_folder_refused(models, tmp_path):
    src = _copy(models, tmp_path, "mistral")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    _refused_source(models, tmp_path, src, f"resolves to {outside}, outside the model folder")


def test_tokenizer_symlink_leaving_folder_refused(models, tmp_path):
    """A tokenizer file is copied into the output: a link to /etc/passwd would publish it."""
    src = _copy(models, tmp_path)
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to("/etc/passwd")
    _refused_source(models, tmp_path, src, "resolves to /etc/passwd, outside the model folder")


def test_hub_cache_links_into_blobs_are_inside():
    """The Hub cache's snapshot files are links into the repo's blobs folder: that is inside."""
    from composer.sources import check_inside

    with tempfile.TemporaryDirectory() as root:
        repo = Path(root) / "models--org--name"
        (repo / "blobs").mkdir(parents=True)
        (repo / "blobs" / "abc").write_bytes(b"x")
        snap = repo / "snapshots" / "0123"
        snap.mkdir(parents=True)
        (snap / "model.safetensors").symlink_to("../../blobs/abc")
        check_inside(snap, snap / "model.safetensors")


# -- 9: FIFOs and folders in place of files, unreadable folders ------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "folder"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "other.safetensors"])
def test_fifo_or_folder_in_place_of_a_file(models, tmp_path, kind, name):
    src = _copy(models, tmp_path)
    (src / name).unlink(missing_ok=True)
    if name == "other.safetensors":
        (src / "model.safetensors").unlink()
    os.mkfifo(src / name) if kind == "fifo" else (src / name).mkdir()
    what = "a FIFO" if kind == "fifo" else "a folder"
    _refused_source(models, tmp_path, src, f"{src / name} is {what}, not a")


def test_fifo_shard_named_by_index(models, tmp_path):
    src = _copy(models, tmp_path, "mistral")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    _refused_source(models, tmp_path, src, f"{shard} is a FIFO, not a")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder: permissions cannot be tested")
def test_unreadable_model_folder(models, tmp_path):
    src = _copy(models, tmp_path)
    src.chmod(0)
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(passthrough(src))
        assert f"cannot read its folder {src} (permission denied)" in fails(recipe)
    finally:
        src.chmod(0o755)


def test_unreadable_model_folder_simulated(models, tmp_path, monkeypatch):
    """What a non-root user sees for a chmod 000 folder, run as root (which ignores permissions)."""
    from composer import sources

    src = _copy(models, tmp_path)
    real = os.access
    monkeypatch.setattr(sources.os, "access", lambda p, mode: False if Path(p) == src else real(p, mode))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(passthrough(src))
    result = CliRunner().invoke(main, [str(recipe), "--dry-run"])
    assert result.exit_code == 1 and f"cannot read its folder {src} (permission denied)" in result.output
    assert "Traceback" not in result.output


# -- 10: NaN and Inf in a merge's inputs -----------------------------------------------------------------------------

def _poisoned(models, tmp_path) -> tuple[Path, list[str]]:
    import torch
    from safetensors.torch import load_file, save_file

    src = _copy(models, tmp_path)
    state = load_file(src / "model.safetensors")
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight", "model.norm.weight"]
    state[names[0]][3, 5] = float("nan")
    state[names[1]][0, 0] = float("inf")
    state[names[2]][-1] = -float("inf")
    save_file({k: v.contiguous() for k, v in state.items()}, src / "model.safetensors", metadata={"format": "pt"})
    assert not torch.isfinite(load_file(src / "model.safetensors")[names[0]]).all()
    return src, names


def test_nan_in_merge_inputs_warns_once_and_writes(models, tmp_path):
    src, names = _poisoned(models, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: {src}}}, {{model: {models['llama-b']}}}]\n"
                      "parameters: {weight: 0.5}\n")
    proc = subprocess.run([*COMPOSE, str(recipe), "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 3 merged tensors hold NaN or Inf: "), proc.stderr
    for name in names:
        assert f"{name} (from '{src}')" in lines[0]
    assert (tmp_path / "out" / "config.json").is_file()


def test_nan_in_passthrough_copy_is_not_read(models, tmp_path):
    """A byte copy never looks at values: no warning, and the bytes are the source's."""
    src, names = _poisoned(models, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    proc = subprocess.run([*COMPOSE, str(recipe), "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""


def test_nan_warning_names_at_most_five():
    from composer.execute import nonfinite_warning

    line = nonfinite_warning({f"t{i}": ("m",) for i in range(8)} | {"t9": ()})
    assert line.startswith("9 merged tensors hold NaN or Inf: t0 (from 'm'); ") and line.count("(from 'm')") == 5
    assert "and 4 more" in line and "\n" not in line
    assert "t9 (finite inputs: the merge overflowed)" in nonfinite_warning({"t9": ()})


# -- 11: an output that is an input --------------------------------------------------------------------------------

def test_output_symlink_into_input_refused(models, tmp_path):
    src = _copy(models, tmp_path)
    before = tree_digest(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    (tmp_path / "link").symlink_to(src)
    (tmp_path / "parent-link").symlink_to(tmp_path)
    assert "is inside source model" in fails(recipe, "--overwrite", out=tmp_path / "link")
    assert "is inside source model" in fails(recipe, out=tmp_path / "link" / "sub")
    assert "is inside source model" in fails(recipe, "--overwrite", out=tmp_path / "parent-link" / src.name)
    assert "is inside destination" in fails(recipe, "--overwrite", out=tmp_path / "parent-link")
    assert tree_digest(src) == before and not (src / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "parent-link", "r.yaml", src.name]


# -- 12: a disk that fills up mid-write ------------------------------------------------------------------------------

def test_disk_full_mid_write_simulated(models, tmp_path, monkeypatch):
    ex = sys.modules["composer.execute"]
    real, calls = ex._flush, []

    def flush(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(ex, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(ex, "_flush", flush)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {models['llama']}, every: 2}}\n")
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the disk filled up while writing" in result.output and "the model needs 1.03 MB" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_mid_write_tmpfs(models, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ex = sys.modules["composer.execute"]
        real = ex._write_chunk

        filled = threading.Lock()

        def fill_then_write(*args):  # another program takes the free space once the run has started
            with filled:  # once: two workers filling at once could rewrite it empty (the second sees no space)
                if not (disk / "filler").exists():
                    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                    (disk / "filler").write_bytes(bytes(max(0, free - 64 * 1024)))
            return real(*args)

        monkeypatch.setattr(ex, "CHUNK_BYTES", 8192)
        monkeypatch.setattr(ex, "_write_chunk", fill_then_write)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"block_expansion: {{model: {models['llama']}, every: 2}}\n")
        result = CliRunner().invoke(main, [str(recipe), "-o", str(disk / "out"), "-q"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "the disk filled up while writing" in result.output and "the model needs 1.03 MB" in result.output
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- 13: two runs to one output --------------------------------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"4242")
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_refused_by_lock(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {models['llama']}, every: 2}}\n")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / ".out.composer-lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = fails(recipe, out=out)
        assert f"another compose run (pid 4242) is writing {out}" in line
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_concurrent_runs_one_refused_one_finishes(models, tmp_path):
    from test_errors import SLOW

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {models['mistral']}, every: 1}}\n")
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", SLOW, str(recipe), "-o", str(out), "-q"],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.composer-partial-*/*.safetensors")):
        time.sleep(0.02)
    assert "another compose run" in fails(recipe, out=out)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # no lock file, no partial folder
    reference = tmp_path / "ref"
    assert CliRunner().invoke(main, [str(recipe), "-o", str(reference), "-q"]).exit_code == 0
    assert tree_digest(out) == tree_digest(reference)


# -- 14: an input that changes while it is read ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["replace", "write in place", "truncate"])
def test_input_changed_mid_run_refused(models, tmp_path, monkeypatch, how):
    from composer import CorruptFileError, execute, plan_recipe

    ex = sys.modules["composer.execute"]
    monkeypatch.setattr(ex, "CHUNK_BYTES", 8192)
    src = _copy(models, tmp_path)
    f = src / "model.safetensors"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    plan = plan_recipe(recipe)
    changed = []

    def progress(n):
        if changed:
            return
        changed.append(n)
        data = f.read_bytes()
        if how == "replace":  # a download tool's rename over the file: same bytes, another inode
            (src / "new").write_bytes(data)
            os.replace(src / "new", f)
        elif how == "write in place":
            with open(f, "r+b") as fh:
                fh.seek(len(data) - 4)
                fh.write(b"\x00\x00\x80\x7f")
        else:
            os.truncate(f, len(data) // 2)

    with pytest.raises(CorruptFileError, match=r"model.safetensors( changed while composing|: tensor .* ends early)"):
        execute(plan, tmp_path / "out", progress=progress)
    assert changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", src.name]


def test_input_replaced_between_plan_and_run_refused_on_open(models, tmp_path):
    from composer import CorruptFileError, execute, plan_recipe

    src = _copy(models, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: {src}}}, {{model: {models['llama-b']}}}]\n"
                      "parameters: {weight: 0.5}\n")
    plan = plan_recipe(recipe)
    data = (src / "model.safetensors").read_bytes()
    (src / "new").write_bytes(data)
    os.replace(src / "new", src / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"model.safetensors changed since the plan was made"):
        execute(plan, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", src.name]


# -- 15: remote code -------------------------------------------------------------------------------------------------

POISON = 'raise RuntimeError("imported: composer must never run remote code")\n'


def test_remote_code_copied_never_run_and_declared(models, tmp_path):
    src = _copy(models, tmp_path)
    (src / "modeling_custom.py").write_text(POISON)
    (src / "configuration_custom.py").write_text(POISON)
    (src / "helpers.py").write_text(POISON)  # imported by the modelling code, as a sibling module
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    before = tree_digest(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {src}, every: 2}}\n")
    dry = subprocess.run([*COMPOSE, str(recipe), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "remote code: needs trust_remote_code=True" in dry.stdout
    assert "configuration_custom.py, modeling_custom.py, helpers.py" in dry.stdout
    js = json.loads(subprocess.run([*COMPOSE, str(recipe), "--dry-run", "--json"], capture_output=True, text=True,
                                   timeout=120).stdout)
    assert js["remote_code"]["trust_remote_code"] is True
    out = tmp_path / "out"
    run = subprocess.run([*COMPOSE, str(recipe), "-o", str(out), "-q"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for name in ("modeling_custom.py", "configuration_custom.py", "helpers.py"):
        assert (out / name).read_text() == POISON
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]
    card = (out / "README.md").read_text()
    assert "## Remote code" in card and "trust_remote_code=True" in card and "- custom_code" in card
    assert tree_digest(src) == before


def test_no_remote_code_no_mention(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"block_expansion: {{model: {models['llama']}, every: 2}}\n")
    dry = subprocess.run([*COMPOSE, str(recipe), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "remote code" not in dry.stdout
