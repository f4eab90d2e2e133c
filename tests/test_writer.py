"""The shard writer's bytes equal safetensors.torch.save_file's for the same tensors."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file
from click.testing import CliRunner

from composer import plan_recipe, reading
from composer.cli import main
from composer.writer import layout_shards, safetensors_header
from composer.sources import TensorInfo
from tinymodels import load_state_dict


class _T:
    def __init__(self, name, dtype, shape, nbytes):
        self.name, self.dtype, self.shape, self.nbytes = name, dtype, shape, nbytes


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_header_equals_save_file(tmp_path, metadata):
    tensors = {
        "b.weight": torch.zeros(3, 5, dtype=torch.bfloat16), "a.weight": torch.ones(2, 2),
        "c": torch.zeros(1, dtype=torch.float16), "z": torch.ones(7), "empty": torch.zeros(0),
        "i": torch.arange(3, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    fake = [_T(n, codes[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()]
    header, _ = safetensors_header(fake, metadata)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert ref[: len(header)] == header


def test_whole_file_equals_save_file(models, write_recipe, tmp_path):
    """A single-model passthrough converted to bf16 writes exactly the file save_file writes for the same dict."""
    src = models["qwen2"]
    recipe = write_recipe(f"merge_method: passthrough\ndtype: bfloat16\nmodels: [{{model: {src}}}]\n")
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    expected = {k: v.to(torch.bfloat16) for k, v in load_state_dict(src).items()}
    save_file(expected, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_each_shard_equals_save_file_of_its_tensors(models, write_recipe, tmp_path):
    src = models["mistral"]
    recipe = write_recipe(f"block_expansion: {{model: {src}, every: 2}}\n")
    out = tmp_path / "out"
    assert CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--shard-size", "150KB"]).exit_code == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        from safetensors.torch import load_file

        tensors = {k: v.clone() for k, v in load_file(shard).items()}
        save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), shard.name


def test_layout_puts_a_large_tensor_alone():
    ts = [TensorInfo(f"t{i}", "F32", (n,), None, 0) for i, n in enumerate([10, 1000, 10, 10])]
    shards = layout_shards(ts, 100)
    assert [len(s.entries) for s in shards] == [1, 1, 2]
    assert [s.file for s in shards][0] == "model-00001-of-00003.safetensors"


@pytest.mark.parametrize("how", ["forced", "refused"])
def test_without_direct_io_the_bytes_are_the_same(models, write_recipe, tmp_path, monkeypatch, how):
    """Direct I/O is an optimisation: buffered writes, asked for or forced by a filesystem that refuses O_DIRECT,
    give the same file."""
    src = models["llama"]
    recipe = write_recipe(f"block_expansion: {{model: {src}, every: 2}}\ndtype: bfloat16\n")
    direct = tmp_path / "direct"
    assert CliRunner().invoke(main, [str(recipe), "-o", str(direct), "-q"]).exit_code == 0
    if how == "forced":
        monkeypatch.setenv("COMPOSER_NO_DIRECT", "1")
    else:
        real_open, refused = os.open, []

        def no_direct(path, flags, *args):
            if flags & os.O_DIRECT:
                refused.append(path)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", no_direct)
    other = tmp_path / "other"
    assert CliRunner().invoke(main, [str(recipe), "-o", str(other), "-q"]).exit_code == 0
    assert (other / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
    if how == "refused":
        assert refused



@pytest.mark.parametrize("budget", [10**12, 100_000])
def test_early_read_ahead_reads_inputs_in_plan_order_within_its_budget(models, write_recipe, monkeypatch, budget):
    plan = plan_recipe(write_recipe(f"block_expansion: {{model: {models['llama']}, every: 2}}\n"))
    monkeypatch.setattr(reading, "EARLY_READ_PIECE", 4096)
    names: dict[int, str] = {}
    reads: list[tuple[str, int, int]] = []
    real_open, real_preadv = os.open, os.preadv

    def spy_open(path, *args):
        fd = real_open(path, *args)
        names[fd] = str(path)
        return fd

    def spy_preadv(fd, buffers, offset):
        reads.append((names[fd], offset, offset + sum(len(b) for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(reading.os, "open", spy_open)
    monkeypatch.setattr(reading.os, "preadv", spy_preadv)
    reading.read_ahead(plan, threading.Event(), budget)

    expected, left = [], budget  # every input's bytes, in the order the chunks need them, until the budget is spent
    for shard in plan.shards:
        for entry in shard.entries:
            for info in entry.tensor.inputs if entry.tensor.op != "zeros" else ():
                for piece in range(info.offset, info.offset + info.nbytes, 4096):
                    if left > 0:
                        expected.append((str(info.file), piece, min(info.offset + info.nbytes, piece + 4096)))
                        left -= expected[-1][2] - piece
    assert reads == expected and len(reads) > 10
    assert budget > plan.file_bytes or sum(b - a for _, a, b in reads) < budget + 4096

    reads.clear()
    stop = threading.Event()
    stop.set()
    reading.read_ahead(plan, stop)
    assert reads == []  # told to stop: nothing more is read


@pytest.mark.parametrize("staged", [False, True])
def test_early_read_ahead_starts_while_torch_imports(models, write_recipe, tmp_path, staged):
    """In a fresh interpreter a plan that computes (a merge: byte copies need no torch) starts the read-ahead once
    torch's core library has loaded and before the rest of torch's import has run (the seconds it is meant to
    use), with the whole EARLY_READ_BYTES to read, or only EARLY_READ_STAGED where the stager reads the merged
    tensors' inputs (what the early read takes the stager leaves to the page cache and the map); the output is
    still the model, byte for byte."""
    a, b = models["llama"], models["llama-b"]
    recipe = write_recipe(f"merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 0.3}}}}, "
                          f"{{model: {b}, parameters: {{weight: 0.7}}}}]\n")
    script = f"""
import sys
import composer
import composer.reading as reading
import composer.staging as staging
staging.STAGE_MIN = 1 if {staged} else 2**40  # the tiny models' tensors staged, or nothing
seen = []
real = reading.read_ahead
def spy(plan, stop, budget, stager):
    torch = sys.modules.get("torch")
    want = reading.EARLY_READ_STAGED if {staged} else reading.EARLY_READ_BYTES
    seen.append(("torch._C" in sys.modules, hasattr(torch, "nn"), (stager is not None) == {staged}, budget == want))
    return real(plan, stop, budget, stager)
reading.read_ahead = spy
composer.compose({str(recipe)!r}, {str(tmp_path / "early")!r})
print(seen)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[(True, False, True, True)]"
    ref = tmp_path / "ref"
    assert CliRunner().invoke(main, [str(recipe), "-o", str(ref), "-q"]).exit_code == 0  # torch loaded: no hook
    for shard in ref.glob("*.safetensors"):
        assert (tmp_path / "early" / shard.name).read_bytes() == shard.read_bytes()


def test_shard_sizes_read_as_mergekit_reads_them(models, tmp_path):
    """mergekit's --out-shard-size 5B means five billion bytes (its K, M, B are thousand, million, billion); a bare
    number below 1 MB would put every tensor in a shard of its own, so it needs a unit."""
    import click
    import pytest

    from composer.cli import parse_size

    assert parse_size("5B") == parse_size("5b") == parse_size("5GB") == 5 * 10**9
    assert parse_size("500K") == parse_size("500KB") == 500_000 and parse_size("2M") == 2 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1000000") == 10**6
    with pytest.raises(click.BadParameter, match="give a unit"):
        parse_size("5000")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {models['llama']}, layer_range: [0, 4]}}]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--out-shard-size", "150K"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.safetensors"))) > 1  # 150,000-byte shards of a ~1 MB model
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "o2"), "-q", "--shard-size", "5000"])
    assert result.exit_code != 0 and "give a unit" in result.output
