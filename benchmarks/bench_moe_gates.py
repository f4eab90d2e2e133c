#!/usr/bin/env python3
"""The memory and time of `gate_mode: hidden` for a 7B base: the one MoE step outside the streaming bound.

Steps
-----
1. **Input**: ``bench_solar``'s random Mistral-7B-v0.1-shaped bf16 checkpoint (generated in ``--workdir`` if
   missing, 14.5 GB), given ``bench_vocab``'s 32000-token tokenizer.
2. **Run**: a process that plans a two-expert mergekit-moe recipe over it with ``gate_mode: hidden`` (four prompts
   per expert) and computes the routers (``Plan.prepare``: the base loaded by transformers in bfloat16, one forward
   pass per expert and prompt list), but writes no weights (a 2 x 7B MoE would not fit this disk; the weights
   stream as in ``bench_moe.py``). Its process tree's RssAnon and RSS are sampled every 20 ms.
3. **Report**: wall time, peak anonymous memory and peak RSS, against the plan's own estimate.

Usage::

    .venv/bin/python benchmarks/bench_moe_gates.py
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import GB, run_with_load  # noqa: E402
from bench_solar import DEFAULT_WORKDIR, FULL, ensure_checkpoint  # noqa: E402
from bench_vocab import TOKENIZER_SCRIPT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GATES = """
import sys, time
import composer
plan = composer.plan_recipe(sys.argv[1])
print(next(n for n in plan.notes if n.startswith("routers:")))
t = time.time()
gates = plan.prepare()
print(f"gate vectors {tuple(gates.shape)} in {time.time() - t:.1f} s")
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    base = args.workdir / "mistral-7b-random"
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(FULL, base, 0)
    py = str(REPO / ".venv" / "bin" / "python")
    if not (base / "tokenizer.json").is_file():
        subprocess.run([py, "-c", TOKENIZER_SCRIPT, str(FULL.vocab), str(base)], check=True)
    prompts = [["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10", "w11"], ["w100 w200", "w300 w400 w500", "w600", "w700 w800"]]
    recipe = args.workdir / "moe-gates.yaml"
    recipe.write_text(f"base_model: {base}\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n" + "".join(
        f"  - source_model: {base}\n    positive_prompts: {json.dumps(ps)}\n" for ps in prompts))
    log = args.workdir / "moe-gates.log"
    res, other = run_with_load("composer", [py, "-c", GATES, str(recipe)], log, 0.02)
    print(log.read_text().strip().splitlines()[-2:], sep="\n")
    if res.returncode:
        return 1
    print("| base | wall s | peak anon GB | peak RSS GB |\n|---|---:|---:|---:|")
    print(f"| Mistral-7B-shaped, bf16 | {res.wall_sync_s:.1f} | {res.peak_anon_bytes / GB:.2f} | "
          f"{res.peak_rss_bytes / GB:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": res.wall_sync_s, "peak_anon_bytes": res.peak_anon_bytes,
                                         "peak_rss_bytes": res.peak_rss_bytes, "other_cpus": other}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
