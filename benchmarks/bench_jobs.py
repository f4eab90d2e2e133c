#!/usr/bin/env python3
"""composer's merge workers: the same merges with ``compose -j N`` for each N of ``--jobs``, in one run.

Inputs, recipes and measurement are ``bench_merge``'s (three random TinyLlama-1.1B-shaped bf16 checkpoints, or
~90 MB ones with ``--small``; page cache dropped or inputs pre-read before each run; wall time with the final
``sync``; the process tree's peak anonymous memory; the CPUs other processes kept busy meanwhile). For each
method, composer runs once per N, N in the order given; the outputs' safetensors files must be byte for byte the
same for every N (the report says so), and the table gives each N's wall time against the first N's.

Usage::

    .venv/bin/python benchmarks/bench_jobs.py --small --methods slerp,ties --jobs 1,2
    .venv/bin/python benchmarks/bench_jobs.py --methods slerp,ties --jobs 1,2 --json bench-jobs.json

Standard library and PyYAML; the script does not import composer.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import FULL, METHODS, SMALL, ensure_inputs, recipe_for, recipe_inputs, run_with_load  # noqa: E402
from bench_solar import DEFAULT_COMPOSER_CMD, DEFAULT_WORKDIR, GB, REPO, machine_info, prepare_cache  # noqa: E402


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as src:
            while chunk := src.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR.with_name(DEFAULT_WORKDIR.name + "-merge"),
                   help="input cache and scratch outputs, shared with bench_merge (default: %(default)s)")
    p.add_argument("--methods", default="slerp,ties", help="comma-separated methods (default: %(default)s)")
    p.add_argument("--jobs", default="1,2", help="comma-separated worker counts, -j N (default: %(default)s)")
    p.add_argument("--small", action="store_true", help="4 layers, hidden 512 (~90 MB per model)")
    p.add_argument("--composer-cmd", default=DEFAULT_COMPOSER_CMD,
                   help="composer command; {recipe} and {out} are substituted, -j N appended (default: %(default)s)")
    p.add_argument("--cache", choices=("auto", "drop", "warm"), default="auto")
    p.add_argument("--interval", type=float, default=0.02, help="memory sampling period, s")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights (fine-tune deltas: +1, +2)")
    p.add_argument("--json", type=Path, help="also save the results as JSON here")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.jobs = [int(j) for j in args.jobs.split(",") if j.strip()]
    if [m for m in args.methods if m not in METHODS] or not args.methods or not args.jobs or min(args.jobs) < 1:
        p.error(f"--methods from {', '.join(METHODS)}; --jobs positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = SMALL if args.small else FULL
    work = args.workdir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    dirs, _ = ensure_inputs(spec, work, args.seed)
    rows, runs, failed = [], [], False
    for method in args.methods:
        recipe = work / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(method, dirs, spec.layers), sort_keys=False))
        first, digests = None, set()
        for jobs in args.jobs:
            out = work / f"out-{method}-j{jobs}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = shlex.split(args.composer_cmd.format(recipe=shlex.quote(str(recipe)), out=shlex.quote(str(out)),
                                                       repo=shlex.quote(str(REPO)))) + ["-j", str(jobs)]
            mode = prepare_cache(args.cache, recipe_inputs(method, dirs))
            print(f"== {method} -j {jobs} (page cache: {mode}): {shlex.join(cmd)}", flush=True)
            res, others = run_with_load(f"composer -j {jobs}", cmd, work / "logs" / f"jobs-{method}-{jobs}.log",
                                        args.interval)
            if res.returncode:
                failed = True
                print(Path(res.log).read_text(errors="replace")[-2000:])
                continue
            digests.add(digest(out))
            shutil.rmtree(out)
            first = first or res.wall_sync_s
            rows.append(f"| {method} | {jobs} | {res.wall_sync_s:.1f} | {res.wall_sync_s / first:.2f}x | "
                        f"{res.peak_anon_bytes / GB:.3f} | {others:.2f} |")
            runs.append({"method": method, "jobs": jobs, "cache": mode, "other_busy_cpus": others,
                         **dataclasses.asdict(res)})
        same = len(digests) == 1
        failed |= not same
        rows.append(f"| {method} | | outputs byte for byte the same for every -j: {'yes' if same else 'NO'} | | | |")
    machine = machine_info(work)
    print(f"\n{spec.num_params():,} parameters per model; {json.dumps(machine)}\ncommand: {shlex.join(sys.argv)}\n")
    print(f"| method | -j | wall s (incl. sync) | / -j {args.jobs[0]} | peak anon GB | other processes' CPUs |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "machine": machine, "runs": runs}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
