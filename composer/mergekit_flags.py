"""mergekit-yaml's flags that compose has nothing to do for: each accepted as a no-op (composer already behaves
so) or refused with composer's way to the same end, never silently different. The flags composer honours with
mergekit's meaning (-j, --random-seed, --allow-crimes, ...) are ordinary options of composer.cli."""
from __future__ import annotations

from typing import Callable

import click

_GPU = "composer computes on the CPU only (it streams tensors; there is no GPU path yet)"

# (click declaration, value refused or None for none, the message's why-and-fix). A `--x/--no-x` pair refuses
# True (the flag) and accepts False (--no-x, mergekit's default).
FLAGS: tuple[tuple[str, object, str], ...] = (
    ("--cuda/--no-cuda", True, f"{_GPU}: drop --cuda"),
    ("--gpu-rich", True, f"it is --cuda --low-cpu-memory --read-to-gpu --multi-gpu in one, and {_GPU}: drop it"),
    ("--low-cpu-memory/--no-low-cpu-memory", True,
     f"{_GPU}, and its memory is already bounded (a few 64 MiB chunks): drop --low-cpu-memory"),
    ("--read-to-gpu/--no-read-to-gpu", True, f"{_GPU}: drop --read-to-gpu"),
    ("--multi-gpu/--no-multi-gpu", True, f"{_GPU}: drop --multi-gpu, and use -j N for N CPU workers"),
    ("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", True,
     "composer never truncates embeddings: set tokenizer_source: base in the recipe, which aligns the embedding "
     "rows by token"),
    ("--no-safe-serialization/--safe-serialization", True,
     "composer writes safetensors only, never pickles: drop --no-safe-serialization"),
    ("--transformers-cache", "any",
     "composer takes the Hub cache from the environment: set HF_HUB_CACHE=PATH (or HF_HOME) instead"),
    ("--lora-merge-dtype", "any",
     "composer rounds every input through the recipe's dtype: set dtype: in the recipe instead"),
    # Accepted, nothing to do: composer already behaves as the flag asks (or never does what it guards against).
    ("--lazy-unpickle/--no-lazy-unpickle", None, ""),
    ("--trust-remote-code/--no-trust-remote-code", None, ""),
    ("--clone-tensors/--no-clone-tensors", None, ""),
    ("--async-write/--no-async-write", None, ""),
    ("--write-threads", None, ""),
    ("--lora-merge-cache", None, ""),  # mergekit needs it for model+adapter; composer merges while streaming
)


# mergekit-moe's own flags (beside mergekit-yaml's, which it shares), the same way.
MOE_FLAGS: tuple[tuple[str, object, str], ...] = (
    ("--load-in-4bit", True, "composer computes the hidden gates in bfloat16 on the CPU, as mergekit-moe does "
                             "without it (bitsandbytes needs a GPU): drop --load-in-4bit"),
    ("--load-in-8bit", True, "composer computes the hidden gates in bfloat16 on the CPU, as mergekit-moe does "
                             "without it (bitsandbytes needs a GPU): drop --load-in-8bit"),
    # composer builds an MoE of identical experts (with a plan note) without being asked
    ("--i-understand-this-is-not-useful-without-training", None, ""),
)


def _refuse(flag: str, refused: object, why: str) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if refused is None or value is None or value is False:
            return
        if refused is True and value is not True:
            return
        given = flag.split("/")[0] if value is True else f"{flag} {value}"
        raise click.UsageError(f"{given}: {why}", ctx)
    return callback


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and value.lower() not in ("cpu", "auto"):
        raise click.UsageError(f"--device {value}: {_GPU}: drop --device (or give --device cpu or auto)", ctx)


def mergekit_flags(f: Callable) -> Callable:
    """Add the flags above to a click command, hidden from --help (the README's "Coming from mergekit" lists them)."""
    f = click.option("--device", callback=_device, expose_value=False, hidden=True)(f)
    for decl, refused, why in reversed((*FLAGS, *MOE_FLAGS)):
        is_pair = "/" in decl
        flag = refused is True or decl in [d for d, _, _ in MOE_FLAGS]
        kwargs: dict = {"default": None} if is_pair else {"is_flag": True, "default": False} if flag \
            else {"type": click.IntRange(min=1) if decl == "--write-threads" else str, "default": None}
        f = click.option(decl, callback=_refuse(decl, refused, why), expose_value=False, hidden=True, **kwargs)(f)
    return f
