#!/usr/bin/env python3
"""Peak memory and time of a union vocabulary on 1.1B checkpoints: 32000 -> 32002 tokens.

Steps
-----
1. **Inputs**: ``bench_merge``'s base and ft1 (TinyLlama-1.1B-shaped, bf16; generated in ``--workdir`` if missing),
   each given a 32000-token word-level tokenizer, and ``ft1-chat``: ft1 with two added special tokens
   (``<|im_start|>``, ``<|im_end|>``), its ``embed_tokens`` and ``lm_head`` two rows longer (the new rows drawn
   N(0, 0.02)), written tensor by tensor in 8 MB pieces.
2. **Runs**, each measured as ``bench_merge`` measures (page cache dropped or inputs pre-read, the process tree's
   RssAnon sampled every 20 ms, wall time with a final sync): ``linear`` of base + ft1 (the same vocabulary:
   nothing aligned), then ``linear`` of base + ft1-chat with ``tokenizer_source: union`` (every embedding and head
   row re-indexed and the two new rows filled as mergekit fills them).
3. **Report**: a Markdown table of wall time and peak anonymous memory, with the <= 1 GB target.

Usage::

    .venv/bin/python benchmarks/bench_vocab.py            # ~2 minutes once the inputs exist
    .venv/bin/python benchmarks/bench_vocab.py --small    # ~90 MB models
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import DEFAULT_WORKDIR, FULL, GB, SMALL, ensure_inputs, run_with_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAT = ("<|im_start|>", "<|im_end|>")
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")

TOKENIZER_SCRIPT = """
import sys, transformers
from tokenizers import Tokenizer, models, pre_tokenizers
n, out = int(sys.argv[1]), sys.argv[2]
specials = ["<unk>", "<s>", "</s>"]
vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(n - len(specials))])}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
if len(sys.argv) > 3:
    fast.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in sys.argv[3:]])
fast.save_pretrained(out)
"""


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _write_extended(src: Path, dst: Path, extra_rows: int, seed: int) -> None:
    """`src` with every vocabulary tensor `extra_rows` rows longer (random bf16 rows), tensor by tensor."""
    import torch

    header, start = _header(src)
    meta = header.pop("__metadata__", None)
    out, offset, plan = {}, 0, []
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        shape = list(entry["shape"])
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        add = extra_rows * (size // shape[0]) if name in VOCAB else 0
        if add:
            shape[0] += extra_rows
        out[name] = {"dtype": entry["dtype"], "shape": shape, "data_offsets": [offset, offset + size + add]}
        plan.append((entry["data_offsets"][0], size, add, shape))
        offset += size + add
    if meta is not None:
        out = {"__metadata__": meta, **out}
    raw = json.dumps(out).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(struct.pack("<Q", len(raw)) + raw)
        for begin, size, add, shape in plan:
            f.seek(start + begin)
            left = size
            while left:
                piece = f.read(min(left, 8 << 20))
                g.write(piece)
                left -= len(piece)
            if add:
                rows = torch.randn((extra_rows, shape[1]), generator=gen) * 0.02
                g.write(rows.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def make_inputs(spec, work: Path, seed: int) -> dict[str, Path]:
    dirs, _ = ensure_inputs(spec, work, seed)
    py = str(REPO / ".venv" / "bin" / "python")
    for name in ("base", "ft1"):
        if not (dirs[name] / "tokenizer.json").is_file():
            subprocess.run([py, "-c", TOKENIZER_SCRIPT, str(spec.vocab), str(dirs[name])], check=True)
    chat = dirs["ft1"].with_name(dirs["ft1"].name + "-chat")
    if not (chat / "tokenizer.json").is_file():
        shutil.rmtree(chat, ignore_errors=True)
        chat.mkdir()
        index = json.loads((dirs["ft1"] / "model.safetensors.index.json").read_text())
        for shard in sorted(set(index["weight_map"].values())):
            _write_extended(dirs["ft1"] / shard, chat / shard, len(CHAT), seed)
        index["metadata"] = {"total_size": sum((chat / s).stat().st_size for s in set(index["weight_map"].values()))}
        (chat / "model.safetensors.index.json").write_text(json.dumps(index))
        config = json.loads((dirs["ft1"] / "config.json").read_text())
        config["vocab_size"] += len(CHAT)
        (chat / "config.json").write_text(json.dumps(config))
        subprocess.run([py, "-c", TOKENIZER_SCRIPT, str(spec.vocab), str(chat), *CHAT], check=True)
    dirs["chat"] = chat
    return dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR.with_name(DEFAULT_WORKDIR.name + "-merge"))
    p.add_argument("--small", action="store_true", help="~90 MB models instead of 1.1B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    spec = SMALL if args.small else FULL
    args.workdir.mkdir(parents=True, exist_ok=True)
    dirs = make_inputs(spec, args.workdir, args.seed)
    runs = {
        "linear, same vocabulary": f"models: [{{model: {dirs['base']}}}, {{model: {dirs['ft1']}}}]\n",
        "linear, union 32000 -> 32002": f"tokenizer_source: union\nbase_model: {dirs['base']}\n"
                                        f"models: [{{model: {dirs['base']}}}, {{model: {dirs['chat']}}}]\n",
    }
    rows, results = [], {}
    for label, body in runs.items():
        recipe = args.workdir / "vocab-bench.yaml"
        recipe.write_text("merge_method: linear\ndtype: bfloat16\nparameters: {weight: 0.5}\n" + body)
        out = args.workdir / "vocab-bench-out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(REPO / ".venv" / "bin" / "compose"), str(recipe), "-o", str(out), "--quiet"]
        res, other = run_with_load("composer", cmd, args.workdir / "vocab-bench.log", 0.02)
        if res.returncode:
            print((args.workdir / "vocab-bench.log").read_text()[-2000:], file=sys.stderr)
            return 1
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        shutil.rmtree(out, ignore_errors=True)
        results[label] = {"wall_s": res.wall_sync_s, "peak_anon_bytes": res.peak_anon_bytes, "vocab_size": vocab,
                          "other_cpus": other}
        ok = "yes" if res.peak_anon_bytes <= GB else "NO"
        rows.append(f"| {label} | {vocab} | {res.wall_sync_s:.1f} | {res.peak_anon_bytes / GB:.2f} | {ok} |")
    print("| run | output vocab_size | wall s | peak anon GB | <= 1 GB |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
