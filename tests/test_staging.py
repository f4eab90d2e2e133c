"""Staged inputs (composer.staging): merged tensors' inputs read with O_DIRECT into one reused buffer ahead of the
workers. An optimisation only: every output must be the same bytes as without it, whatever the buffer's size,
the order readers and workers meet in, or a failure of the readers."""
from __future__ import annotations

import errno
import importlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from composer import plan_recipe, staging
from composer.cli import main
from composer.report import peak_memory_estimate
from composer.staging import Stager, cached_share, stageable

EXECUTE = importlib.import_module("composer.execute")  # the module (the package exports a function of that name)

METHOD_RECIPES = {
    "linear": "merge_method: linear\nmodels:\n- model: {a}\n  parameters: {{weight: 0.3}}\n"
              "- model: {b}\n  parameters: {{weight: 0.7}}\n",
    "ties": "merge_method: ties\nbase_model: {a}\nmodels:\n- model: {b}\n  parameters: {{weight: 0.6, density: 0.5}}\n"
            "- model: {c}\n  parameters: {{weight: 0.4, density: 0.3}}\n",
    "della": "merge_method: della\nbase_model: {a}\nmodels:\n"
             "- model: {b}\n  parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}\n"
             "- model: {c}\n  parameters: {{weight: 0.4, density: 0.4, epsilon: 0.1}}\n",
    "karcher": "merge_method: karcher\nmodels:\n- model: {a}\n- model: {b}\n- model: {c}\n",
    "sce": "merge_method: sce\nbase_model: {a}\nmodels:\n- model: {b}\n- model: {c}\n"
           "parameters: {{select_topk: 0.5}}\n",
}


def _recipe(write_recipe, models, method: str, dtype: str = "bfloat16") -> Path:
    text = METHOD_RECIPES[method].format(a=models["llama"], b=models["llama-b"], c=models["llama-c"])
    return write_recipe(text + f"dtype: {dtype}\n", name=f"{method}.yaml")


def _compose(recipe: Path, out: Path, *args: str) -> dict[str, bytes]:
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", *args])
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture
def force_staging(monkeypatch):
    """Stage every input of the tiny models (their inputs sit in the page cache and are KBs), in a buffer of
    `budget` bytes; returns the Stagers made, to count what they read."""
    made: list[Stager] = []
    real = staging.make_stager

    def setup(budget: int, direct: bool = True) -> list[Stager]:
        monkeypatch.setattr(staging, "CHECK_CACHE", False)
        monkeypatch.setattr(staging, "STAGE_MIN", 0)
        monkeypatch.setattr(staging, "STAGE_SHARE", 1)
        monkeypatch.setattr(staging, "STAGE_BYTES", budget)
        monkeypatch.setattr(staging, "DIRECT", direct)

        def recording(plan):
            stager = real(plan)
            if stager is not None:
                made.append(stager)
            return stager

        monkeypatch.setattr(EXECUTE, "make_stager", recording)
        return made

    return setup


def _direct_works(folder: Path) -> bool:
    try:
        os.close(os.open(next(folder.glob("*.safetensors")), os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False


@pytest.mark.parametrize("method", sorted(METHOD_RECIPES))
@pytest.mark.parametrize("budget", [72 * 1024, 2**20])  # a few tensors (the ring wraps, readers wait), or all
def test_staged_inputs_give_the_same_bytes(models, write_recipe, tmp_path, force_staging, monkeypatch, method,
                                           budget):
    recipe = _recipe(write_recipe, models, method)
    monkeypatch.setenv("COMPOSER_NO_STAGE", "1")
    plain = _compose(recipe, tmp_path / "plain")
    monkeypatch.delenv("COMPOSER_NO_STAGE")
    made = force_staging(budget, direct=_direct_works(models["llama"]))
    for jobs in ("1", "2"):
        staged = _compose(recipe, tmp_path / f"staged-{jobs}", "-j", jobs)
        assert staged == plain
    assert len(made) == 2
    for stager in made:
        counts = stager.counts()
        assert counts["staged"] > 0, counts  # the buffer was used, not only the map
        assert counts["pending"] == counts["reading"] == counts["ready"] == 0, counts  # all done with
        assert stager.held() == 0  # every room given back once its tensors were written


def test_a_wrapped_ring_reuses_room_in_order(models, write_recipe, force_staging):
    """The buffer's rooms: taken after the newest, wrapped to the start when the end is full, freed oldest first."""
    force_staging(64 * 1024, direct=False)
    stager = Stager(plan_recipe(_recipe(write_recipe, models, "linear")))
    assert stager._room(40 * 1024) == 0
    stager._ring.append([0, 40 * 1024, False])
    assert stager._room(16 * 1024) == 40 * 1024
    stager._ring.append([40 * 1024, 56 * 1024, False])
    assert stager._room(16 * 1024) is None  # 8 KB left at the end, none at the start
    stager._ring[0][2] = True  # the oldest freed: the ring starts again at 0
    stager._ring.popleft()
    assert stager._room(16 * 1024) == 0
    stager._ring.append([0, 16 * 1024, False])
    assert stager._room(32 * 1024) is None  # wrapped: only [16 KB, 40 KB) before the oldest
    assert stager._room(24 * 1024) == 16 * 1024


def test_a_worker_never_waits_for_an_input_not_yet_read(models, write_recipe, force_staging):
    """An input the readers have not started is read through the map, and the readers then skip it."""
    force_staging(2**20, direct=False)
    plan = plan_recipe(_recipe(write_recipe, models, "linear"))
    stager = Stager(plan)  # not started: every input pending
    info = next(i for t in plan.tensors if t.is_merge for i in t.inputs if stager.planned(i))
    assert stager.view(info) is None
    assert not stager.planned(info)
    assert stager.counts()["skipped"] == 1


def test_cached_inputs_are_read_through_the_map(models, write_recipe, tmp_path, monkeypatch):
    """The default: inputs already in the page cache (the tiny models just written) are not re-read from disk."""
    monkeypatch.setattr(staging, "STAGE_MIN", 0)
    made = []
    real = staging.make_stager
    monkeypatch.setattr(EXECUTE, "make_stager", lambda plan: made.append(real(plan)) or made[-1])
    recipe = _recipe(write_recipe, models, "ties")
    folder = models["llama"]
    shard = next(folder.glob("*.safetensors"))
    fd = os.open(shard, os.O_RDONLY)
    try:
        os.read(fd, 1 << 20)
        share = cached_share(fd, 0, min(shard.stat().st_size, 1 << 20))
    finally:
        os.close(fd)
    _compose(recipe, tmp_path / "out")
    assert made and made[0] is not None
    assert made[0].counts()["staged"] == 0
    if share is not None:  # the kernel has cachestat (Linux 6.5+): it saw the pages just read
        assert share > 0.5


def test_refused_direct_io_falls_back_to_the_map(models, write_recipe, tmp_path, force_staging, monkeypatch):
    recipe = _recipe(write_recipe, models, "ties")
    plain = _compose(recipe, tmp_path / "plain")
    made = force_staging(2**20, direct=True)
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    assert _compose(recipe, tmp_path / "refused") == plain
    assert made[0].counts()["staged"] == 0


def test_a_failing_reader_leaves_the_rest_to_the_map(models, write_recipe, tmp_path, force_staging, monkeypatch):
    """A reader that fails unexpectedly (here: every read) costs speed only: same bytes, exit 0, no traceback."""
    recipe = _recipe(write_recipe, models, "della")
    plain = _compose(recipe, tmp_path / "plain")
    made = force_staging(72 * 1024, direct=False)

    def broken(self, fd, slot):
        raise MemoryError("no room")

    monkeypatch.setattr(Stager, "_read", broken)
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "broken"), "-q", "-j", "2"])
    assert result.exit_code == 0 and result.output == ""
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "broken").glob("*.safetensors"))} == plain
    counts = made[0].counts()
    assert counts["staged"] == 0 and counts["reading"] == 0 and made[0].held() == 0


def test_what_is_staged(models, write_recipe, monkeypatch):
    """Direct inputs of merged tensors, within the size bounds, in output order, each counted once per reader;
    not a passthrough's or a cast's inputs."""
    recipe = write_recipe(f"merge_method: linear\nmodels:\n- model: {models['llama']}\n  parameters: {{weight: 1}}\n"
                          f"- model: {models['llama-b']}\n  parameters: {{weight: 1}}\ndtype: bfloat16\n")
    plan = plan_recipe(recipe)
    monkeypatch.setattr(staging, "STAGE_MIN", 16 * 1024)
    slots = stageable(plan, budget=4 * 64 * 1024)
    assert slots and all(16 * 1024 <= s.nbytes <= 64 * 1024 for s in slots.values())
    assert all(s.users == 1 for s in slots.values())
    merged_inputs = [(i.file, i.offset) for sh in plan.shards for e in sh.entries if e.tensor.is_merge
                     for i in e.tensor.inputs]
    assert list(slots) == [k for k in merged_inputs if k in slots]  # the output's order
    assert not stageable(plan_recipe(write_recipe(f"block_expansion: {{model: {models['llama']}, every: 2}}\n",
                                                  name="grow.yaml")))


def test_the_memory_estimate_counts_the_buffer(models, write_recipe, monkeypatch):
    plan = plan_recipe(_recipe(write_recipe, models, "ties"))
    monkeypatch.setattr(staging, "STAGE_MIN", 0)
    with_buffer = peak_memory_estimate(plan)
    monkeypatch.setenv("COMPOSER_NO_STAGE", "1")
    assert with_buffer - peak_memory_estimate(plan) == staging.STAGE_BYTES
