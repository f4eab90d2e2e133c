#!/usr/bin/env python3
"""A 4 x 1.1B mixture of experts (Mixtral layout, `gate_mode: cheap_embed`): composer against mergekit-moe 0.1.5.

Steps
-----
1. **Inputs**: ``bench_merge``'s base, ft1 and ft2 (TinyLlama-1.1B-shaped, bf16; generated in ``--workdir`` if
   missing), the base with ``bench_vocab``'s 32000-token tokenizer (the prompts are tokenized with it).
2. **Recipe**: mergekit-moe's YAML, base ``base``, experts ft1, ft2, base, ft1 (four experts, two per token), each
   with its own prompts, ``dtype: bfloat16``: a 22-layer Mixtral of about 6.6 GB.
3. **Runs**, one after the other, each measured as ``bench_merge`` measures (page cache dropped or inputs pre-read,
   the process tree's RssAnon sampled every 20 ms, wall time with a final sync): composer, then mergekit-moe
   (default options). The outputs' tensor names, dtypes and shapes are compared, and a few sampled tensors byte for
   byte.
4. **Report**: a Markdown table, with the targets: composer <= 0.5x mergekit-moe's wall time, <= 1 GB peak anon.

Usage::

    .venv/bin/python benchmarks/bench_moe.py            # a few minutes once the inputs exist
    .venv/bin/python benchmarks/bench_moe.py --small    # ~90 MB models
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import DEFAULT_WORKDIR, FULL, GB, SMALL, read_output, run_with_load  # noqa: E402
from bench_vocab import make_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [["w10 w11 w12", "w13 w14"], ["w200 w201"], ["w3000 w3001 w3002"], ["w17 w18", "w19"]]


def recipe(dirs: dict[str, Path]) -> str:
    lines = [f"base_model: {dirs['base']}", "gate_mode: cheap_embed", "dtype: bfloat16", "experts_per_token: 2",
             "experts:"]
    for model, prompts in zip(("ft1", "ft2", "base", "ft1"), PROMPTS):
        lines += [f"  - source_model: {dirs[model]}", f"    positive_prompts: {json.dumps(prompts)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR.with_name(DEFAULT_WORKDIR.name + "-merge"))
    p.add_argument("--small", action="store_true", help="~90 MB models instead of 1.1B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mergekit-moe", default=str(REPO / ".venv-mergekit" / "bin" / "mergekit-moe"))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    spec = SMALL if args.small else FULL
    args.workdir.mkdir(parents=True, exist_ok=True)
    dirs = make_inputs(spec, args.workdir, args.seed)
    path = args.workdir / "moe-bench.yaml"
    path.write_text(recipe(dirs))
    tools = {"composer": [str(REPO / ".venv" / "bin" / "compose"), str(path), "-o", "{out}", "--quiet"],
             "mergekit-moe 0.1.5": [args.mergekit_moe, str(path), "{out}"]}
    samples = ["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "model.layers.3.mlp.experts.down_proj",
               "model.layers.21.mlp.experts.gate_up_proj", "model.layers.5.self_attn.q_proj.weight"]
    results, outputs = {}, {}
    for tool, cmd in tools.items():
        out = args.workdir / f"moe-bench-{tool.split()[0]}"
        shutil.rmtree(out, ignore_errors=True)
        res, other = run_with_load(tool, [c.replace("{out}", str(out)) for c in cmd],
                                   args.workdir / f"moe-bench-{tool.split()[0]}.log", 0.02)
        if res.returncode:
            print((args.workdir / f"moe-bench-{tool.split()[0]}.log").read_text()[-3000:], file=sys.stderr)
            return 1
        outputs[tool] = read_output(out, [s for s in samples if spec.layers > 21 or ".21." not in s])
        shutil.rmtree(out, ignore_errors=True)
        results[tool] = {"wall_s": res.wall_sync_s, "peak_anon_bytes": res.peak_anon_bytes,
                         "peak_rss_bytes": res.peak_rss_bytes, "other_cpus": other}
    (meta_a, bytes_a), (meta_b, bytes_b) = outputs.values()
    same_layout = meta_a == meta_b
    same_samples = bytes_a == bytes_b
    ours, theirs = results["composer"], results["mergekit-moe 0.1.5"]
    ratio = ours["wall_s"] / theirs["wall_s"]
    print("| tool | wall s | ratio | peak RSS GB | peak anon GB |\n|---|---:|---:|---:|---:|")
    for tool, r in results.items():
        print(f"| {tool} | {r['wall_s']:.1f} | {r['wall_s'] / theirs['wall_s']:.2f}x | "
              f"{r['peak_rss_bytes'] / GB:.2f} | {r['peak_anon_bytes'] / GB:.2f} |")
    print(f"\nsame tensor names, dtypes and shapes: {same_layout}; sampled tensors byte for byte: {same_samples}")
    print(f"targets: <= 0.5x mergekit-moe's wall time: {'met' if ratio <= 0.5 else 'NOT met'} ({ratio:.2f}x); "
          f"<= 1 GB peak anon: {'met' if ours['peak_anon_bytes'] <= GB else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "same_layout": same_layout,
                                         "same_samples": same_samples}, indent=2))
    return 0 if same_layout and same_samples else 1


if __name__ == "__main__":
    sys.exit(main())
