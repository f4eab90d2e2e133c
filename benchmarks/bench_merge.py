#!/usr/bin/env python3
"""Benchmark every merge method on three 1.1B Llama checkpoints: composer vs mergekit vs the I/O floor.

Steps
-----
1. **Inputs.**  Three random bf16 checkpoints shaped like
   ``TinyLlama/TinyLlama-1.1B`` (hidden 2048, intermediate 5632, 22 layers,
   32 heads, 4 KV heads, vocab 32000, untied ``lm_head``: 201 tensors,
   1,100,048,384 parameters, 2.2 GB each) are generated in ``--workdir`` and
   reused by later runs.  ``base`` is N(0, 0.02) (RMSNorm weights 1) drawn
   with seed ``--seed``; ``ft1`` and ``ft2`` are ``base + 0.002 * N(0, 1)``
   (every tensor, norms included, rounded to bf16) with seeds ``--seed + 1``
   and ``--seed + 2``, so they look like two fine-tunes of one base.  Each is
   written tensor by tensor in small chunks (~100 MB of memory) with
   ``bench_solar``'s generator, so shards are cut the way bench_solar cuts
   them (2 shards per model, index + ``config.json``).

2. **Recipes** (mergekit syntax, ``dtype: bfloat16``), one per method of
   ``METHODS`` (every method both tools have; see ``recipe_for``):

   * ``linear``: ft1 + ft2, weight 0.5 each; ``nuslerp``: ft1 + ft2, weights
     0.4 / 0.6; ``karcher``: base + ft1 + ft2, no base;
   * ``slerp``: base + ft1 over all layers, ``t`` a gradient as in
     ``recipes/slerp-gradient.yaml`` (self_attn 0 -> 0.5 -> 0.3 -> 0.7 -> 1,
     mlp the reverse, 0.5 elsewhere);
   * ``nearswap`` (``t`` 0.002) and ``arcee_fusion``: base + ft1;
   * the others: base + ft1 + ft2 with base ``base``: weight 0.5 each where
     the method has weights, density 0.5 for ties / DARE / DELLA (epsilon 0.1),
     0.9 with gamma 0.01 for the Breadcrumbs pair, ``select_topk`` 0.5 for sce.

3. **Runs**: for each method, composer, then mergekit, then the I/O floor,
   one after the other, writing to ``--workdir``.  The I/O floor is the disk
   work no merge can avoid, done by plain tools: ``cp`` of the first input
   model's shards (as many bytes as the merged output, within its header)
   while ``cat`` reads the other inputs to ``/dev/null``, so every input is
   read once and the output's bytes written once (``--skip-io`` leaves it
   out); it runs ``--floor-runs`` times (3) and the table takes the median
   run, as the disk's speed varies from run to run.  Measurement is ``bench_solar``'s: before each
   run the disk settles and the page cache is dropped (or, if that is not
   permitted, the inputs are pre-read), the process tree's summed ``VmRSS``
   and ``RssAnon`` are sampled every 20 ms, and the wall time includes a final
   ``sync``; the CPU time other processes used meanwhile is reported too
   (runs where they kept > 0.25 CPUs busy are flagged).  Each output's safetensors headers are read (names, dtypes,
   shapes, plus the bytes of a few small tensor samples) before it is
   deleted; composer's and mergekit's are then compared: same tensor names,
   dtypes and shapes is required, the largest difference of the sampled
   values is reported.

4. **Report**: a Markdown table, one row per method, and the targets for
   every method: composer peak anon <= 1 GB; composer wall <= 0.5x
   mergekit's (<= 0.25x for slerp) and <= 2.0x the I/O floor's (how far it
   is from the disk's limit, which decides the ratio on a slow disk).

Usage::

    .venv/bin/python benchmarks/bench_merge.py --small          # smoke test, ~90 MB models
    .venv/bin/python benchmarks/bench_merge.py --json bench-merge.json   # all methods, ~1 hour
    .venv/bin/python benchmarks/bench_merge.py --methods ties,sce            # a subset

Standard library, PyYAML and torch (only in a spawned generator process);
the script does not import composer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import shutil
import struct
import sys
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solar import (  # noqa: E402
    add_run_options,
    DEFAULT_WORKDIR,
    GB,
    REPO,
    ModelSpec,
    Result,
    ensure_checkpoint,
    machine_info,
    prepare_cache,
    run_measured,
    safetensors_header,
)

METHODS = ("linear", "slerp", "nuslerp", "model_stock", "multislerp", "karcher", "task_arithmetic", "ties",
           "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear", "sce", "ram",
           "ramplus_tl", "nearswap", "arcee_fusion")
DELTA_STD = 0.002
# composer wall (incl. sync) / mergekit wall (incl. sync) must not exceed this
WALL_TARGETS = {m: 0.25 if m == "slerp" else 0.5 for m in METHODS}
FLOOR_TARGET = 2.0  # composer wall / the I/O floor's, every method
ANON_TARGET = 1 * GB
SAMPLE_ELEMS = 65536  # values compared per sampled tensor
BUSY_WARN = 0.25  # warn when other processes kept this many CPUs busy on average during a run
IO_FLOOR = "io floor (cp + cat)"


# --------------------------------------------------------------------------
# Model shape and inputs
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaSpec(ModelSpec):
    """Shape of a Llama checkpoint (tensors as bench_solar's Mistral spec); TinyLlama-1.1B by default."""

    layers: int = 22
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    def config(self) -> dict:
        """config.json as published for TinyLlama-1.1B, with this shape."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
            "transformers_version": "4.35.0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


FULL = LlamaSpec()
SMALL = LlamaSpec(layers=4, hidden=512, intermediate=1408, heads=8, kv_heads=2)


def write_finetune_shard(path: Path, tensors: list, gen, base_dir: Path, std: float,
                         chunk: int = 8 << 20) -> None:
    """Write ``base shard + std * N(0, 1)`` (bf16) to ``path``, chunk by chunk.

    The base shard of the same name has exactly this header (same spec), so its data section is streamed
    through in order, whatever tensor the chunk belongs to.
    """
    import torch

    header = safetensors_header(tensors)
    buf = bytearray(2 * chunk)
    noise = torch.empty(chunk, dtype=torch.float32)
    with open(base_dir / path.name, "rb") as src, open(path, "wb") as dst:
        if src.read(len(header)) != header:
            raise RuntimeError(f"{base_dir / path.name}: header differs from the planned one")
        dst.write(header)
        while n := src.readinto(buf):
            x = torch.frombuffer(buf, dtype=torch.bfloat16, count=n // 2).float()
            x += noise[: n // 2].normal_(0.0, std, generator=gen)
            dst.write(x.to(torch.bfloat16).view(torch.int16).numpy())


def ensure_inputs(spec: LlamaSpec, work: Path, seed: int) -> tuple[dict[str, Path], dict[str, float | None]]:
    """Generate (or reuse) base, ft1, ft2; returns their folders and generation times (None = reused)."""
    tag = "tinyllama-1.1b-random" if spec == FULL else f"llama-random-L{spec.layers}-H{spec.hidden}"
    dirs = {name: work / f"{tag}-{name}" for name in ("base", "ft1", "ft2")}
    times = {"base": ensure_checkpoint(spec, dirs["base"], seed)}
    for k, name in enumerate(("ft1", "ft2"), 1):
        write = functools.partial(write_finetune_shard, base_dir=dirs["base"], std=DELTA_STD)
        extra = {"base": str(dirs["base"]), "base_seed": seed, "delta_std": DELTA_STD}
        # a regenerated base is identical (same seed), so the fine-tunes stay valid
        times[name] = ensure_checkpoint(spec, dirs[name], seed + k, write=write, extra=extra)
    return dirs, times


def _models(*entries: tuple[Path, dict | None]) -> list[dict]:
    return [{"model": str(m), **({"parameters": p} if p else {})} for m, p in entries]


def recipe_for(method: str, dirs: dict[str, Path], layers: int) -> dict:
    """The benchmark's recipe for `method`, in mergekit syntax, over base, ft1 and ft2."""
    base, ft1, ft2 = (dirs[k] for k in ("base", "ft1", "ft2"))
    half = {"weight": 0.5}
    sparse = {"weight": 0.5, "density": 0.5}
    three = {  # base_model, models, shared parameters
        "task_arithmetic": (base, _models((base, None), (ft1, half), (ft2, half)), {}),
        "ties": (base, _models((base, None), (ft1, sparse), (ft2, sparse)), {"normalize": True}),
        "breadcrumbs": (base, _models((base, None), (ft1, {**half, "density": 0.9, "gamma": 0.01}),
                                      (ft2, {**half, "density": 0.9, "gamma": 0.01})), {}),
        "breadcrumbs_ties": (base, _models((base, None), (ft1, {**half, "density": 0.9, "gamma": 0.01}),
                                           (ft2, {**half, "density": 0.9, "gamma": 0.01})), {}),
        "dare_linear": (base, _models((base, None), (ft1, sparse), (ft2, sparse)), {}),
        "dare_ties": (base, _models((base, None), (ft1, sparse), (ft2, sparse)), {}),
        "della": (base, _models((base, None), (ft1, {**sparse, "epsilon": 0.1}), (ft2, {**sparse, "epsilon": 0.1})),
                  {"lambda": 1.0}),
        "della_linear": (base, _models((base, None), (ft1, {**sparse, "epsilon": 0.1}),
                                       (ft2, {**sparse, "epsilon": 0.1})), {"lambda": 1.0}),
        "model_stock": (base, _models((base, None), (ft1, None), (ft2, None)), {}),
        "nuslerp": (None, _models((ft1, {"weight": 0.4}), (ft2, {"weight": 0.6})), {}),
        "multislerp": (base, _models((base, None), (ft1, half), (ft2, half)), {}),
        "karcher": (None, _models((base, None), (ft1, None), (ft2, None)), {}),
        "sce": (base, _models((base, None), (ft1, None), (ft2, None)), {"select_topk": 0.5}),
        "ram": (base, _models((base, None), (ft1, None), (ft2, None)), {}),
        "ramplus_tl": (base, _models((base, None), (ft1, None), (ft2, None)), {}),
        "nearswap": (base, _models((base, None), (ft1, None)), {"t": 0.002}),
        "arcee_fusion": (base, _models((base, None), (ft1, None)), {}),
    }
    if method == "linear":
        return {"models": _models((ft1, half), (ft2, half)), "merge_method": "linear", "dtype": "bfloat16"}
    if method == "slerp":
        return {
            "slices": [{"sources": [{"model": str(base), "layer_range": [0, layers]},
                                    {"model": str(ft1), "layer_range": [0, layers]}]}],
            "merge_method": "slerp",
            "base_model": str(base),
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]},
            "dtype": "bfloat16",
        }
    if method not in three:
        raise ValueError(method)
    b, models, shared = three[method]
    return {"models": models, "merge_method": method, **({"base_model": str(b)} if b else {}),
            **({"parameters": shared} if shared else {}), "dtype": "bfloat16"}


def recipe_models(method: str, dirs: dict[str, Path]) -> list[list[Path]]:
    """The input shards a method's recipe reads, model by model (in the order the recipe names them)."""
    recipe = recipe_for(method, dirs, 1)
    entries = recipe.get("models") or recipe["slices"][0]["sources"]
    folders = list(dict.fromkeys(Path(e["model"]) for e in entries))
    return [sorted(d.glob("*.safetensors")) for d in folders]


def recipe_inputs(method: str, dirs: dict[str, Path]) -> list[Path]:
    return [p for model in recipe_models(method, dirs) for p in model]


def io_floor_command(method: str, dirs: dict[str, Path], out: Path) -> list[str]:
    """The I/O floor of a merge with plain tools: cp the first input model's shards into ``out`` while cat reads
    the other inputs; exits non-zero if either fails."""
    first, *rest = recipe_models(method, dirs)
    script = 'cat "$@" > /dev/null & reader=$!; cp -L ' + " ".join(shlex.quote(str(p)) for p in first) + \
        " " + shlex.quote(str(out)) + '/ && wait "$reader"'
    return ["sh", "-c", script, "io-floor", *(str(p) for model in rest for p in model)]


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not iowait) since boot."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the contender's tree once it was waited for)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_with_load(tool: str, cmd: list[str], log: Path, interval: float) -> tuple[Result, float]:
    """bench_solar's run_measured, plus the average number of CPUs that other processes kept busy meanwhile

    (machine busy time minus the contender's and this sampler's; kernel writeback threads count as other).
    """
    busy0, own0 = busy_cpu_s(), own_cpu_s()
    res = run_measured(tool, cmd, log, interval)
    other = (busy_cpu_s() - busy0) - (own_cpu_s() - own0)
    return res, max(0.0, other) / max(res.wall_sync_s, 1e-9)


# --------------------------------------------------------------------------
# Output comparison
# --------------------------------------------------------------------------


def sample_names(spec: LlamaSpec) -> list[str]:
    mid = spec.layers // 2
    return ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
            "model.layers.0.self_attn.k_proj.weight", f"model.layers.{mid}.self_attn.q_proj.weight",
            f"model.layers.{mid}.mlp.down_proj.weight", f"model.layers.{spec.layers - 1}.mlp.up_proj.weight"]


def read_output(out: Path, samples: list[str]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, bytes]]:
    """Tensor name -> (dtype, shape) over all safetensors files, and the first bytes of ``samples``."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    data: dict[str, bytes] = {}
    for p in sorted(out.rglob("*.safetensors")):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                if name in tensors:
                    raise ValueError(f"{name} appears twice in {out}")
                tensors[name] = (info["dtype"], tuple(info["shape"]))
                if name in samples and info["dtype"] == "BF16":
                    start, end = info["data_offsets"]
                    f.seek(8 + n + start)
                    data[name] = f.read(min(end - start, 2 * SAMPLE_ELEMS))
    return tensors, data


def bf16_floats(raw: bytes) -> array:
    words = array("H", raw)
    if sys.byteorder != "little":
        words.byteswap()
    return array("f", array("I", (w << 16 for w in words)).tobytes())


def compare_outputs(a: dict, b: dict) -> dict:
    """Compare read_output() results of composer (a) and mergekit (b)."""
    ta, da = a["tensors"], a["samples"]
    tb, db = b["tensors"], b["samples"]
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    differ = sorted(n for n in set(ta) & set(tb) if ta[n] != tb[n])
    per_tensor = {}
    for name in sorted(set(da) & set(db)):
        xa, xb = bf16_floats(da[name]), bf16_floats(db[name])
        diffs = [abs(u - v) for u, v in zip(xa, xb)]
        per_tensor[name] = {"values": len(diffs), "differ": sum(d > 0 for d in diffs),
                            "max_abs_diff": max(diffs, default=0.0),
                            "max_abs_value": max(map(abs, xb), default=0.0)}
    worst = max(per_tensor, key=lambda n: per_tensor[n]["max_abs_diff"], default=None)
    return {
        "same_headers": not (only_a or only_b or differ),
        "tensors": len(ta),
        "only_composer": only_a[:10],
        "only_mergekit": only_b[:10],
        "dtype_or_shape_differs": [f"{n}: {ta[n]} vs {tb[n]}" for n in differ[:10]],
        "sampled_values": sum(t["values"] for t in per_tensor.values()),
        "sampled_differ": sum(t["differ"] for t in per_tensor.values()),
        "worst_sample": worst,
        "samples": per_tensor,
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def median_run(runs: list[Result]) -> Result | None:
    """The run of median wall time (the lower middle one of an even count): the floor is the disk's, measured
    --floor-runs times per method because it varies from run to run (2.7-7.0 s within one run of 2026-12-06)."""
    runs = sorted(runs, key=lambda r: r.wall_sync_s)
    return runs[(len(runs) - 1) // 2] if runs else None


def report(results: dict[str, list[Result]], checks: dict[str, dict], load: dict[str, dict[str, float]],
           gen: dict, machine: dict,
           argv: list[str], cache_mode: str) -> tuple[list[str], bool]:
    lines = [
        "| method | composer s | mergekit s | I/O floor s | composer / mergekit | composer / floor "
        "| mergekit / floor | composer peak anon GB | mergekit peak anon GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets: list[str] = []
    all_pass = True

    def cell(r: Result | None, fmt: str, value) -> str:
        return fmt.format(value(r)) if r is not None else "failed"

    for method, rs in results.items():
        runs = {r.tool: r for r in rs}
        comp, mk = (next((r for r in rs if r.tool == t and r.returncode == 0), None) for t in ("composer", "mergekit"))
        io = median_run([r for r in rs if r.tool == IO_FLOOR and r.returncode == 0])
        ratio = comp.wall_sync_s / mk.wall_sync_s if comp and mk else None
        floor = comp.wall_sync_s / io.wall_sync_s if comp and io else None
        mk_floor = mk.wall_sync_s / io.wall_sync_s if mk and io else None
        row = [method] + [cell(r, "{:.1f}", lambda r: r.wall_sync_s) if t in runs else ""
                          for t, r in (("composer", comp), ("mergekit", mk), (IO_FLOOR, io))]
        row += ["" if x is None else f"{x:.2f}x" for x in (ratio, floor, mk_floor)]
        row += [cell(r, "{:.3f}", lambda r: r.peak_anon_bytes / GB) if t in runs else ""
                for t, r in (("composer", comp), ("mergekit", mk))]
        lines.append("| " + " | ".join(row) + " |")
        if comp:
            ok = comp.peak_anon_bytes <= ANON_TARGET
            all_pass &= ok
            targets.append(f"- {method}: composer peak anon <= 1 GB: {comp.peak_anon_bytes / GB:.3f} GB "
                           f"-> {'PASS' if ok else 'FAIL'}")
        if ratio is not None:
            ok = ratio <= WALL_TARGETS[method]
            all_pass &= ok
            targets.append(f"- {method}: composer wall <= {WALL_TARGETS[method]}x mergekit: {ratio:.2f}x "
                           f"-> {'PASS' if ok else 'FAIL'}")
        if floor is not None:
            ok = floor <= FLOOR_TARGET
            all_pass &= ok
            targets.append(f"- {method}: composer wall <= {FLOOR_TARGET}x the I/O floor: {floor:.2f}x "
                           f"-> {'PASS' if ok else 'FAIL'}")
        if not comp:
            all_pass = False
            targets.append(f"- {method}: composer not run or failed, targets not checked")
    lines += ["", "Targets:"] + targets
    lines += ["", "Output check (composer vs mergekit):"]
    for method, c in checks.items():
        if c["same_headers"]:
            w = c["samples"].get(c["worst_sample"], {})
            lines.append(f"- {method}: same {c['tensors']} tensor names, dtypes and shapes; "
                         f"{c['sampled_differ']:,} of {c['sampled_values']:,} sampled values differ"
                         + (f", worst {c['worst_sample']}: {w['differ']:,} of {w['values']:,} by up to "
                            f"{w['max_abs_diff']:.3g} (its largest |value| {w['max_abs_value']:.3g})"
                            if c["sampled_differ"] else ""))
        else:
            lines.append(f"- {method}: HEADERS DIFFER: only composer {c['only_composer']}, only mergekit "
                         f"{c['only_mergekit']}, differing {c['dtype_or_shape_differs']}")
    busy = [f"{m} {t} {v:.2f}" for m, d in load.items() for t, v in d.items()]
    lines += ["", "CPUs kept busy by other processes during each run (average; kernel writeback included): "
              + ", ".join(busy) + "."]
    noisy = [f"{m} {t}" for m, d in load.items() for t, v in d.items() if v > BUSY_WARN]
    if noisy:
        lines.append(f"WARNING: the machine was not quiet (> {BUSY_WARN} CPUs busy elsewhere) during: "
                     + ", ".join(noisy) + "; those timings are unreliable.")
    gen_txt = ", ".join(f"{k} {'reused' if v is None else f'{v:.1f} s'}" for k, v in gen.items())
    lines += ["", f"Input generation: {gen_txt}.",
              f"Page cache before each run: {cache_mode}"
              + (" (dropped: every run starts cold)" if cache_mode == "drop" else
                 " (drop_caches not permitted: inputs pre-read with cat, every run starts warm)")]
    lines += ["", "Command lines:", "", "```", shlex.join(argv)]
    lines += list(dict.fromkeys(f"{m} {r.tool}: {r.cmd}" for m, rs in results.items() for r in rs)) + ["```"]
    floors = [f"{m} " + "/".join(f"{r.wall_sync_s:.1f}" for r in rs if r.tool == IO_FLOOR) for m, rs in results.items()
              if any(r.tool == IO_FLOOR for r in rs)]
    if floors:
        lines += ["", "I/O floor runs, s (the table takes the median): " + ", ".join(floors) + "."]
    lines += ["", f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), "
              f"{machine['mem_total_bytes'] / 2**30:.1f} GiB RAM, {machine['filesystem']} on the workdir, "
              f"Linux {machine['kernel']}, Python {machine['python']}"]
    return lines, all_pass


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR.with_name(DEFAULT_WORKDIR.name + "-merge"),
                   help="input cache and scratch outputs (default: %(default)s); needs ~9 GB free at full size")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--small", action="store_true",
                   help="smoke test: 4 layers, hidden 512, intermediate 1408, 8/2 heads (~90 MB per model)")
    p.add_argument("--skip-io", action="store_true",
                   help="do not measure the I/O floor (cp of one input model while cat reads the others)")
    p.add_argument("--floor-runs", type=int, default=3,
                   help="I/O floor runs per method, after composer's and mergekit's; the table takes the median "
                        "(default: %(default)s)")
    add_run_options(p, seed_help="seed of the base weights (fine-tune deltas: +1, +2)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = SMALL if args.small else FULL
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    print(f"shape: {spec} ({spec.num_params():,} parameters, {2 * spec.num_params() / GB:.2f} GB per model)")
    dirs, gen = ensure_inputs(spec, work, args.seed)
    samples = sample_names(spec)

    tools = [(t, c) for t, c, skip in (("composer", args.composer_cmd, args.skip_composer),
                                       ("mergekit", args.mergekit_cmd, args.skip_mergekit)) if not skip]
    tools += [] if args.skip_io else [(IO_FLOOR, None)] * args.floor_runs
    results: dict[str, list[Result]] = {}
    outputs: dict[str, dict[str, dict]] = {}
    checks: dict[str, dict] = {}
    modes: set[str] = set()
    load: dict[str, dict[str, float]] = {}
    failed = False
    for method in args.methods:
        recipe = work / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(method, dirs, spec.layers), sort_keys=False))
        results[method], outputs[method], load[method] = [], {}, {}
        for tool, template in tools:
            key = tool.split()[0]  # composer, mergekit, io
            out = work / f"out-{method}-{key}"
            if out.exists():
                shutil.rmtree(out)
            if template is None:  # the I/O floor: cp needs its destination folder
                out.mkdir()
                cmd = io_floor_command(method, dirs, out)
            else:
                cmd = shlex.split(template.format(recipe=shlex.quote(str(recipe)), out=shlex.quote(str(out)),
                                                  repo=shlex.quote(str(REPO))))
            mode = prepare_cache(args.cache, recipe_inputs(method, dirs))
            modes.add(mode)
            print(f"\n== {method} / {tool} (page cache: {mode}): {shlex.join(cmd)}", flush=True)
            res, others = run_with_load(tool, cmd, work / "logs" / f"{method}-{key}.log", args.interval)
            load[method][tool] = others
            res.cache_mode = mode
            if out.exists() and template is None:
                res.output_files = len(list(out.iterdir()))
                res.output_bytes = sum(p.stat().st_size for p in out.iterdir())
                shutil.rmtree(out)
                os.sync()
            elif out.exists():
                tensors, data = read_output(out, samples)
                res.output_files = len(list(out.rglob("*.safetensors")))
                res.output_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
                res.output_tensors = len(tensors)
                if res.returncode == 0:
                    outputs[method][tool] = {"tensors": tensors, "samples": data}
                shutil.rmtree(out)
                os.sync()
            print(f"   rc={res.returncode} wall={res.wall_s:.1f}s (+sync {res.wall_sync_s:.1f}s) "
                  f"peak RSS {res.peak_rss_bytes / GB:.2f} GB, peak anon {res.peak_anon_bytes / GB:.3f} GB, "
                  f"{res.output_bytes:,} bytes, {res.output_tensors} tensors in {res.output_files} files; "
                  f"other processes kept {others:.2f} CPUs busy", flush=True)
            if res.returncode:
                failed = True
                print(f"   FAILED, last lines of {res.log}:")
                print("   " + "\n   ".join(Path(res.log).read_text(errors="replace").splitlines()[-15:]))
            elif template is not None and res.output_tensors != len(spec.tensors()):
                print(f"   WARNING: {res.output_tensors} tensors in the output, expected {len(spec.tensors())}")
            results[method].append(res)
        if len(outputs[method]) == 2:
            checks[method] = compare_outputs(outputs[method]["composer"], outputs[method]["mergekit"])
            failed |= not checks[method]["same_headers"]

    machine = machine_info(work)
    cache_mode = "/".join(sorted(modes))
    full_argv = [sys.executable, str(Path(__file__).resolve())] + argv
    lines, all_pass = report(results, checks, load, gen, machine, full_argv, cache_mode)
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "argv": full_argv,
            "spec": dataclasses.asdict(spec),
            "num_params": spec.num_params(),
            "delta_std": DELTA_STD,
            "generation_s": gen,
            "cache_mode": cache_mode,
            "machine": machine,
            "recipes": {m: recipe_for(m, dirs, spec.layers) for m in args.methods},
            "results": {m: [dataclasses.asdict(r) for r in rs] for m, rs in results.items()},
            "checks": checks,
            "other_busy_cpus": load,
            "targets_pass": all_pass,
        }, indent=2) + "\n")
        print(f"\nsaved {args.json}")
    if args.clean:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        print("removed the generated inputs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
