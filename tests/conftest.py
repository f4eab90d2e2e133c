"""Shared fixtures: tiny random checkpoints of each architecture, made once per session, and a recipe writer."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tinymodels import make_checkpoint

ARCHS = {
    # name: (arch, sharded) - Qwen2 carries q/k/v biases and tied embeddings by default.
    "llama": ("llama", False),
    "mistral": ("mistral", True),
    "qwen2": ("qwen2", True),
    "qwen2-single": ("qwen2", False),
}


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {name: make_checkpoint(root / name, arch, sharded=sharded) for name, (arch, sharded) in ARCHS.items()}
    made["llama-b"] = make_checkpoint(root / "llama-b", "llama", seed=1)
    made["llama-bf16"] = make_checkpoint(root / "llama-bf16", "llama", dtype=__import__("torch").bfloat16, seed=2)
    # For the merge cross-checks of test_mergekit: a third llama (3-model methods), a second sharded mistral and
    # a second qwen2 (tied embeddings, q/k/v biases).
    made["llama-c"] = make_checkpoint(root / "llama-c", "llama", seed=3)
    made["mistral-b"] = make_checkpoint(root / "mistral-b", "mistral", sharded=True, seed=1)
    made["qwen2-b"] = make_checkpoint(root / "qwen2-b", "qwen2", seed=1)
    # Three llamas whose values are multiples of 1/64: their task vectors take a few dozen distinct values, so
    # every magnitude cut runs through a run of equal values (the ranked methods' tie rule decides what is kept).
    for name in ("llama", "llama-b", "llama-c"):
        made[f"{name}-q"] = _quantized(made[name], root / f"{name}-q", 1 / 64)
    return made


def _quantized(source: Path, dest: Path, step: float) -> Path:
    """A copy of a checkpoint folder with every tensor rounded to a multiple of `step`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    for shard in dest.glob("*.safetensors"):
        save_file({k: (v / step).round() * step for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    return dest


@pytest.fixture
def write_recipe(tmp_path):
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def tree_digest(folder: Path) -> dict[str, str]:
    """Hash of every file under a folder, to prove inputs are never modified."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }
