"""Regenerate examples/tiny-llama/: a tiny random 8-layer Llama used by the README quick start."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tinymodels import make_checkpoint  # noqa: E402


def main() -> None:
    out = make_checkpoint(
        ROOT / "examples" / "tiny-llama",
        "llama",
        num_layers=8,
        hidden_size=64,
        intermediate_size=32,  # keeps the folder under 1 MB
        dtype=torch.float32,
        sharded=False,
        with_tokenizer=True,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
