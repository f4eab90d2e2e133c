#!/usr/bin/env python3
"""Benchmark a SOLAR-style depth up-scaling merge: composer vs mergekit vs cp.

The SOLAR recipe stacks layers [0, 24) and [8, 32) of Mistral-7B-v0.1 into a
48-layer model (a ``passthrough`` merge: no arithmetic, pure tensor I/O), so
the ideal tool is bounded by disk bandwidth.  This script measures how close
each tool gets to a plain ``cp`` of the same number of bytes.

Steps
-----
1. **Input checkpoint.**  A random checkpoint shaped exactly like
   ``mistralai/Mistral-7B-v0.1`` is generated in ``--workdir`` (bf16, 291
   tensors, 7,241,732,096 parameters, untied ``lm_head``, 2 safetensors shards
   + ``model.safetensors.index.json`` + the published ``config.json``).
   Shards are split the way ``save_pretrained(max_shard_size="10GB")`` split
   the published files (state-dict order, new shard when the next tensor
   would exceed 10**9 * 10 bytes), so shard 1 ends after layer 22's attention
   projections, as on the Hub.  Each shard is written by hand: the safetensors
   header first, then every tensor's bytes, generated in small chunks of
   N(0, 0.02) values, so peak memory stays ~100 MB.  The checkpoint is
   reused on later runs if it is complete (a marker file records its shape).
   No tokenizer files are written (so mergekit logs a harmless "failed to
   copy tokenizer" error; the real tokenizer is ~2 MB and irrelevant here).

2. **Recipe.**  ``recipes/solar.yaml`` from the repo (or the same recipe
   inline if that file does not exist) with every ``model:`` replaced by the
   local checkpoint path.  At reduced scale (``--small`` or ``--layers``) the
   layer ranges are scaled by ``layers / 32``, i.e. [0, 3L/4) and [L/4, L).

3. **Runs**, one after the other, each a subprocess writing to
   ``--workdir`` (same filesystem as the input):

   * ``composer``: ``--composer-cmd`` (default ``<repo>/.venv/bin/compose
     {recipe} -o {out} --quiet``),
   * ``mergekit``: ``--mergekit-cmd`` (default ``<repo>/.venv-mergekit/bin/mergekit-yaml``, else ``/tmp/mkvenv/bin/mergekit-yaml
     {recipe} {out}``, default options),
   * ``cp``: one ``cp -L`` process copying exactly as many bytes as
     composer's safetensors output (mergekit's if composer was skipped or
     failed).  The sources are the input shards, taken in turn (shard 1,
     shard 2, shard 1, ...) while they still fit in the byte budget, plus one
     "filler" file of random bytes holding the exact remainder.  The filler
     is created (and cached) before the timed run.  cp thus reads input
     shards -- possibly the same one twice, as composer reads layers 8..23
     twice -- and writes exactly the same byte count.  Sources are passed as
     symlinks named ``part-NN`` so a single ``cp`` invocation can copy the
     same shard twice.

   Before every run the page cache is dropped (``sync; echo 3 >
   /proc/sys/vm/drop_caches``).  If that is not permitted, the inputs are
   instead read once with ``cat > /dev/null`` so every contender starts
   equally warm (``--cache`` forces either mode).  The mode used is reported.
   After the command exits, ``sync`` is run and counted: both the
   wall-to-exit and the wall-including-sync are reported; ratios to cp use
   the latter (it is the time until the bytes are really on disk).

   Memory: every ``--interval`` seconds (default 20 ms) the process and all
   of its descendants are found via ``/proc/<pid>/task/<tid>/children`` and
   their ``VmRSS`` and ``RssAnon`` (``/proc/<pid>/status``) are summed; the
   peaks of these sums are "peak RSS" (includes page-cache pages of mmapped
   files, hence the larger number for mmap readers) and "peak anon" (heap:
   the memory a tool really needs).  As a cross-check, ``ru_maxrss`` from
   ``wait4()`` (the kernel's high-water mark of the main process and its
   reaped children, no sampling gaps) is recorded too.

4. **Report**: a Markdown table (GB = 10**9 bytes), the exact command lines,
   the machine, and the targets (composer peak anon <= 1 GB and composer wall
   <= 1.0x cp; the mergekit ratio for reference).  ``--json PATH`` saves
   everything.

5. Every output is deleted right after it is measured.  The generated input
   is kept for reuse unless ``--clean`` is given.

Usage::

    # quick smoke test (8 layers, hidden 1024: ~0.5 GB on disk)
    .venv/bin/python benchmarks/bench_solar.py --small

    # the real thing (needs ~14.5 GB input + ~21.5 GB output + filler, free)
    .venv/bin/python benchmarks/bench_solar.py --json bench-solar.json

Only the Python standard library, PyYAML and torch (for random numbers) are
needed; the script does not import composer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
HUB_MODEL = "mistralai/Mistral-7B-v0.1"
REF_LAYERS = 32  # layer count the recipe's layer ranges refer to
GB = 1e9

INLINE_RECIPE = """\
slices:
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [0, 24]
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""

DEFAULT_COMPOSER_CMD = f"{REPO}/.venv/bin/compose {{recipe}} -o {{out}} --quiet"
DEFAULT_MERGEKIT_CMD = (
    "{repo}/.venv-mergekit/bin/mergekit-yaml {recipe} {out}"
    if (Path(__file__).resolve().parent.parent / ".venv-mergekit" / "bin" / "mergekit-yaml").exists()
    else "/tmp/mkvenv/bin/mergekit-yaml {recipe} {out}"
)
SETTLE_S = 10
DEFAULT_WORKDIR = Path("/work/bench-data")

# --------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of a Mistral-architecture checkpoint."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """All tensors in PyTorch state-dict order (as save_pretrained sees them)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def num_params(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        """config.json as published for Mistral-7B-v0.1, with this shape."""
        return {
            "architectures": ["MistralForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
            # the published file says torch_dtype; transformers >= 4.56 says dtype
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
            "transformers_version": "4.34.0.dev0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


FULL = ModelSpec()
SMALL = ModelSpec(layers=8, hidden=1024, intermediate=3584, heads=8, kv_heads=2)
# The published shards were cut at 10 GB; smaller shapes scale that limit so
# they also get 2 shards split at the same relative place.
FULL_SHARD_LIMIT = 10 * 10**9


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------
# Checkpoint generation
# --------------------------------------------------------------------------


def plan_shards(spec: ModelSpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors into shards like transformers' ``shard_checkpoint``."""
    limit = FULL_SHARD_LIMIT * (spec.num_params() * 2) // (FULL.num_params() * 2)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in spec.tensors():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """Header (length prefix + JSON, space-padded to 8 bytes) for BF16 tensors.

    Tensors are laid out in name order, as the safetensors library does.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in sorted(tensors):
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_random_bf16(f, numel: int, gen, std: float = 0.02, chunk: int = 8 << 20) -> None:
    """Append ``numel`` N(0, std) bf16 values to ``f``, ``chunk`` at a time."""
    import torch

    buf = torch.empty(chunk, dtype=torch.bfloat16)
    left = numel
    while left:
        n = min(left, chunk)
        part = buf[:n].normal_(0.0, std, generator=gen)
        f.write(part.view(torch.int16).numpy())
        left -= n


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], gen) -> None:
    """Stream one safetensors shard to disk, tensor by tensor."""
    import torch

    with open(path, "wb") as f:
        f.write(safetensors_header(tensors))
        for name, shape in sorted(tensors):
            if name.endswith("norm.weight"):  # RMSNorm weights are ~1 in real models
                f.write(torch.ones(_numel(shape), dtype=torch.bfloat16).view(torch.int16).numpy())
            else:
                write_random_bf16(f, _numel(shape), gen)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def ensure_checkpoint(spec: ModelSpec, model_dir: Path, seed: int, write: Callable | None = None,
                      extra: dict | None = None) -> float | None:
    """Generate the checkpoint unless a complete one exists.

    ``write(path, tensors, gen)`` writes one shard (default ``write_shard``: random weights); ``extra`` is
    recorded in the marker file too, so a checkpoint made differently is not reused.
    Returns the generation time in seconds, or None if it was reused.
    """
    shards = plan_shards(spec)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    marker = model_dir / ".complete"
    want = {"spec": dataclasses.asdict(spec), "seed": seed, "shards": names, **(extra or {})}
    if marker.exists():
        try:
            ok = json.loads(marker.read_text()) == want and all(
                (model_dir / n).stat().st_size == len(safetensors_header(s)) + sum(2 * _numel(t[1]) for t in s)
                for n, s in zip(names, shards)
            )
        except (OSError, ValueError):
            ok = False
        if ok:
            print(f"reusing checkpoint {model_dir}")
            return None

    print(f"generating {spec.num_params():,}-parameter checkpoint in {model_dir} ...", flush=True)
    t0 = time.perf_counter()
    in_fresh_process(generate_checkpoint, spec, model_dir, names, shards, seed, write or write_shard)
    marker.write_text(json.dumps(want))
    dt = time.perf_counter() - t0
    print(f"generated in {dt:.1f} s", flush=True)
    return dt


def in_fresh_process(fn: Callable, *args) -> None:
    """Run ``fn(*args)`` in a spawned interpreter.

    Everything that needs torch runs there, so this process stays small:
    the contenders are forked from it and a child's ``ru_maxrss`` starts at
    the parent's high-water mark, which would spoil the cross-check.
    """
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        pool.submit(fn, *args).result()


def generate_checkpoint(spec: ModelSpec, model_dir: Path, names: list[str], shards: list, seed: int,
                        write: Callable | None = None) -> None:
    import torch

    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp = model_dir.with_name(model_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for name, tensors in zip(names, shards):
        (write or write_shard)(tmp / name, tensors, gen)
        weight_map.update({t: name for t, _ in tensors})
        print(f"  wrote {name} ({(tmp / name).stat().st_size / GB:.2f} GB)", flush=True)
    index = {
        "metadata": {"total_size": 2 * spec.num_params()},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                    "transformers_version": "4.34.0.dev0"}, indent=2) + "\n"
    )
    os.sync()
    tmp.rename(model_dir)


# --------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------


def write_recipe(model_dir: Path, layers: int, dest: Path) -> tuple[Path, int]:
    """Write the SOLAR recipe pointing at ``model_dir``, scaled to ``layers``.

    Returns the path and the number of layers the merged model will have.
    """
    import yaml

    src = REPO / "recipes" / "solar.yaml"
    recipe = yaml.safe_load(src.read_text() if src.exists() else INLINE_RECIPE)
    out_layers = 0

    def fix(node):
        nonlocal out_layers
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("model", "base_model") and isinstance(value, str):
                    node[key] = str(model_dir)
                elif key == "layer_range" and isinstance(value, list):
                    scaled = [v * layers // REF_LAYERS for v in value]
                    if any(v * layers % REF_LAYERS for v in value):
                        raise SystemExit(f"layer_range {value} does not scale to {layers} layers")
                    node[key] = scaled
                    out_layers += scaled[1] - scaled[0]
                else:
                    fix(value)
        elif isinstance(node, list):
            for item in node:
                fix(item)

    fix(recipe)
    dest.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"recipe ({'from ' + str(src) if src.exists() else 'inline'}) -> {dest}")
    return dest, out_layers


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _children_by_scan(pid: int) -> list[int]:
    """Fallback for kernels without CONFIG_PROC_CHILDREN: scan /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


CHILDREN = _children if os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children") else _children_by_scan


def process_tree(root: int) -> list[int]:
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += CHILDREN(pid)
    return tree


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM of one process in kB ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return out


@dataclasses.dataclass
class Result:
    tool: str
    cmd: str
    returncode: int = 0
    wall_s: float = 0.0
    wall_sync_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_anon_bytes: int = 0
    max_hwm_bytes: int = 0  # largest VmHWM seen on any process of the tree
    ru_maxrss_bytes: int = 0  # wait4() high-water mark of the main process
    samples: int = 0
    output_bytes: int = 0  # safetensors bytes (all bytes for cp)
    output_files: int = 0
    output_tensors: int | None = None
    cache_mode: str = ""
    log: str = ""


def run_measured(tool: str, argv: list[str], log_path: Path, interval: float) -> Result:
    """Run ``argv``, sampling the memory of its process tree until it exits."""
    res = Result(tool=tool, cmd=shlex.join(argv), log=str(log_path))
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            rss = anon = 0
            for pid in process_tree(proc.pid):
                st = status_kb(pid)
                rss += st.get("VmRSS", 0)
                anon += st.get("RssAnon", 0)
                res.max_hwm_bytes = max(res.max_hwm_bytes, st.get("VmHWM", 0) * 1024)
            res.peak_rss_bytes = max(res.peak_rss_bytes, rss * 1024)
            res.peak_anon_bytes = max(res.peak_anon_bytes, anon * 1024)
            res.samples += 1
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(interval)
        t_exit = time.perf_counter()
        os.sync()
        t_sync = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    res.returncode = proc.returncode
    res.wall_s = t_exit - t0
    res.wall_sync_s = t_sync - t0
    res.ru_maxrss_bytes = usage.ru_maxrss * 1024  # kB on Linux
    return res


def prepare_cache(mode: str, inputs: list[Path]) -> str:
    """Drop the page cache (or, failing that / if asked, pre-read the inputs).

    First let the disk settle: deleting the previous contender's 21 GB output makes ext4 (mounted with online
    discard here) send discards for a while, which would otherwise slow whichever contender runs next.
    """
    os.sync()
    time.sleep(SETTLE_S)
    os.sync()
    if mode in ("auto", "drop"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop"
        except OSError as e:
            if mode == "drop":
                raise SystemExit(f"cannot drop the page cache: {e}")
    for p in inputs:
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    return "warm"


def safetensors_stats(out: Path, all_files: bool) -> tuple[int, int, int | None]:
    """(bytes, files, tensors) of the outputs under ``out``."""
    nbytes = files = 0
    tensors: int | None = 0
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        if all_files or p.name.endswith(".safetensors"):
            nbytes += p.stat().st_size
            files += 1
            if p.name.endswith(".safetensors") and tensors is not None:
                try:
                    with open(p, "rb") as f:
                        (n,) = struct.unpack("<Q", f.read(8))
                        tensors += len(json.loads(f.read(n))) - 1  # minus __metadata__
                except (OSError, ValueError, struct.error):
                    tensors = None
    return nbytes, files, tensors if not all_files else None


def write_filler(path: Path, nbytes: int) -> None:
    """``nbytes`` of random bf16 values (incompressible, like the shards)."""
    import torch

    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        write_random_bf16(f, nbytes // 2, torch.Generator().manual_seed(1))
        f.write(os.urandom(nbytes % 2))
    tmp.rename(path)


def prepare_cp_sources(shards: list[Path], target: int, workdir: Path) -> tuple[Path, list[Path]]:
    """Symlinks to input shards (+ a random filler) whose sizes sum to ``target``.

    Returns the symlink directory and the real files behind it.
    """
    picked: list[Path] = []
    total, stuck, i = 0, 0, 0
    while stuck < len(shards):  # take shards in turn while any still fits
        s = shards[i % len(shards)]
        i += 1
        if total + s.stat().st_size <= target:
            picked.append(s)
            total += s.stat().st_size
            stuck = 0
        else:
            stuck += 1
    rest = target - total
    for old in workdir.glob("cp-filler-*.bin"):
        if old.name != f"cp-filler-{rest}.bin":
            old.unlink()
    if rest:
        filler = workdir / f"cp-filler-{rest}.bin"
        if not filler.exists() or filler.stat().st_size != rest:
            print(f"writing {rest / GB:.2f} GB cp filler", flush=True)
            in_fresh_process(write_filler, filler, rest)
        picked.append(filler)
    links = workdir / "cp-src"
    if links.exists():
        shutil.rmtree(links)
    links.mkdir()
    for n, p in enumerate(picked):
        (links / f"part-{n:02d}").symlink_to(p)
    return links, picked


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def machine_info(workdir: Path) -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    fs = "?"
    try:  # longest mount point containing workdir
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, fstype, *_ = line.split()
                if str(workdir.resolve()).startswith(mnt) and len(mnt) > len(best):
                    best, fs = mnt, fstype
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "filesystem": fs,
        "python": sys.version.split()[0],
    }


def report(results: list[Result], machine: dict, argv: list[str], cache_mode: str, target_from: str) -> list[str]:
    cp = next((r for r in results if r.tool == "cp" and r.returncode == 0), None)
    lines = [
        "| tool | wall (s) | wall incl. sync (s) | ratio to cp | peak RSS (GB) | peak anon (GB) | output bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r.wall_sync_s / cp.wall_sync_s:.2f}x" if cp and r.returncode == 0 else "-"
        name = r.tool if r.returncode == 0 else f"{r.tool} (FAILED rc={r.returncode})"
        lines.append(
            f"| {name} | {r.wall_s:.1f} | {r.wall_sync_s:.1f} | {ratio} | {r.peak_rss_bytes / GB:.2f} "
            f"| {r.peak_anon_bytes / GB:.3f} | {r.output_bytes:,} |"
        )
    lines += ["", "Cross-check (kernel high-water marks, GB): " + "; ".join(
        f"{r.tool}: ru_maxrss {r.ru_maxrss_bytes / GB:.2f}, max VmHWM in tree {r.max_hwm_bytes / GB:.2f}"
        f" ({r.samples} samples)" for r in results)]
    lines += ["", f"Page cache before each run: {cache_mode}"
              + (" (dropped: every run starts cold)" if cache_mode == "drop" else
                 " (drop_caches not permitted: inputs pre-read with cat, every run starts warm)"),
              f"cp byte budget taken from: {target_from}. Ratios use wall incl. sync."]
    lines += ["", "Command lines:", "", "```", shlex.join(argv)]
    lines += [f"{r.tool}: {r.cmd}" for r in results] + ["```"]
    lines += ["", f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), "
              f"{machine['mem_total_bytes'] / 2**30:.1f} GiB RAM, {machine['filesystem']} on the workdir, "
              f"Linux {machine['kernel']}, Python {machine['python']}"]
    comp = next((r for r in results if r.tool == "composer"), None)
    mk = next((r for r in results if r.tool == "mergekit"), None)
    lines += ["", "Targets:"]
    if comp and comp.returncode == 0:
        anon_ok = comp.peak_anon_bytes <= 1 * GB
        lines.append(f"- composer peak anon <= 1 GB: {comp.peak_anon_bytes / GB:.3f} GB "
                     f"-> {'PASS' if anon_ok else 'FAIL'}")
        if cp:
            ratio = comp.wall_sync_s / cp.wall_sync_s
            lines.append(f"- composer wall <= 1.0x cp: {ratio:.2f}x -> {'PASS' if ratio <= 1.0 else 'FAIL'}")
    else:
        lines.append("- composer: not run or failed, targets not checked")
    if mk and mk.returncode == 0 and cp:
        lines.append(f"- mergekit (reference): {mk.wall_sync_s / cp.wall_sync_s:.2f}x cp, "
                     f"peak anon {mk.peak_anon_bytes / GB:.2f} GB")
    return lines


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def add_run_options(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The options every benchmark here shares: the two commands, what to skip, cache, sampling, seed, output."""
    p.add_argument("--composer-cmd", default=DEFAULT_COMPOSER_CMD,
                   help="composer command; {recipe} and {out} are substituted (default: %(default)s)")
    p.add_argument("--mergekit-cmd", default=DEFAULT_MERGEKIT_CMD,
                   help="mergekit command, same placeholders (default: %(default)s)")
    p.add_argument("--skip-composer", action="store_true", help="do not run composer")
    p.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    p.add_argument("--cache", choices=("auto", "drop", "warm"), default="auto",
                   help="before each run: drop the page cache (auto: if permitted) or pre-read the inputs")
    p.add_argument("--interval", type=float, default=0.02, help="memory sampling period, s (default: 0.02)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--json", type=Path, help="also save the results as JSON here")
    p.add_argument("--clean", action="store_true", help="delete the generated inputs at the end")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="input cache and scratch outputs (default: %(default)s); must have room for "
                        "input + 1.5x input + filler")
    scale = p.add_argument_group("scale (default: full Mistral-7B-v0.1 shape)")
    scale.add_argument("--small", action="store_true",
                       help="smoke-test preset: 8 layers, hidden 1024, intermediate 3584, 8/2 heads")
    scale.add_argument("--layers", type=int, help="override the layer count (multiple of 4)")
    scale.add_argument("--hidden", type=int, help="override the hidden size (heads = hidden / 128)")
    scale.add_argument("--intermediate", type=int, help="override the MLP size")
    add_run_options(p, seed_help="seed of the random weights")
    args = p.parse_args(argv)
    if args.layers is not None and (args.layers < 4 or args.layers % 4):
        p.error("--layers must be a positive multiple of 4")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = SMALL if args.small else FULL
    if args.layers or args.hidden or args.intermediate:
        hidden = args.hidden or spec.hidden
        heads = max(1, hidden // 128)
        spec = dataclasses.replace(spec, layers=args.layers or spec.layers, hidden=hidden,
                                   intermediate=args.intermediate or spec.intermediate,
                                   heads=heads, kv_heads=max(1, heads // 4))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    tag = "mistral-7b-v0.1-random" if spec == FULL else (
        f"mistral-random-L{spec.layers}-H{spec.hidden}-I{spec.intermediate}")
    model_dir = work / tag
    print(f"shape: {spec} ({spec.num_params():,} parameters, {2 * spec.num_params() / GB:.2f} GB)")

    gen_s = ensure_checkpoint(spec, model_dir, args.seed)
    shards = sorted(model_dir.glob("model-*.safetensors"))
    recipe, out_layers = write_recipe(model_dir, spec.layers, work / f"solar-{tag}.yaml")
    expected_tensors = 9 * out_layers + 3

    def command(template: str, out: Path) -> list[str]:
        return shlex.split(template.format(recipe=shlex.quote(str(recipe)), out=shlex.quote(str(out)),
                                           repo=shlex.quote(str(REPO))))

    runs = []
    if not args.skip_composer:
        runs.append(("composer", args.composer_cmd))
    if not args.skip_mergekit:
        runs.append(("mergekit", args.mergekit_cmd))

    results: list[Result] = []
    modes = set()

    def measure(tool: str, argv_: list[str], out: Path, inputs: list[Path], all_files: bool) -> Result:
        """Run one contender from a clean state; measure it and delete its output.

        ``all_files``: count every output byte (cp) rather than just *.safetensors,
        and create ``out`` first (cp copies into an existing directory).
        """
        if out.exists():
            shutil.rmtree(out)
        if all_files:
            out.mkdir()
        mode = prepare_cache(args.cache, inputs)
        modes.add(mode)
        print(f"\n== {tool} (page cache: {mode}): {shlex.join(argv_)}", flush=True)
        res = run_measured(tool, argv_, work / "logs" / f"{tool}.log", args.interval)
        res.cache_mode = mode
        if out.exists():
            res.output_bytes, res.output_files, res.output_tensors = safetensors_stats(out, all_files)
            shutil.rmtree(out)
            os.sync()
        print(f"   rc={res.returncode} wall={res.wall_s:.1f}s (+sync {res.wall_sync_s:.1f}s) "
              f"peak RSS {res.peak_rss_bytes / GB:.2f} GB, peak anon {res.peak_anon_bytes / GB:.3f} GB, "
              f"{res.output_bytes:,} bytes in {res.output_files} files", flush=True)
        if res.returncode:
            print(f"   FAILED, last lines of {res.log}:")
            print("   " + "\n   ".join(Path(res.log).read_text(errors="replace").splitlines()[-15:]))
        elif res.output_tensors is not None and res.output_tensors != expected_tensors:
            print(f"   WARNING: {res.output_tensors} tensors in the output, expected {expected_tensors}")
        results.append(res)
        return res

    for tool, template in runs:
        measure(tool, command(template, work / f"out-{tool}"), work / f"out-{tool}", shards, all_files=False)

    ok = [r for r in results if r.returncode == 0 and r.output_bytes]
    if ok:
        target, target_from = ok[0].output_bytes, f"{ok[0].tool} output ({ok[0].output_bytes:,} bytes)"
    else:  # nothing ran: use what a passthrough merge would write (tensor bytes only)
        per_layer = sum(2 * _numel(s) for n, s in spec.tensors() if n.startswith("model.layers.0."))
        target = 2 * spec.num_params() - spec.layers * per_layer + out_layers * per_layer
        target_from = f"computed tensor bytes ({target:,})"
    links, real = prepare_cp_sources(shards, target, work)
    print(f"\ncp byte budget {target:,} from {target_from}: {', '.join(p.name for p in real)}")
    out = work / "out-cp"
    cp_argv = ["cp", "-L"] + [str(p) for p in sorted(links.iterdir())] + [str(out) + "/"]
    measure("cp", cp_argv, out, list(dict.fromkeys(real)), all_files=True)
    shutil.rmtree(links)

    machine = machine_info(work)
    cache_mode = "/".join(sorted(modes))
    full_argv = [sys.executable, str(Path(__file__).resolve())] + argv
    lines = report(results, machine, full_argv, cache_mode, target_from)
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "argv": full_argv,
            "spec": dataclasses.asdict(spec),
            "num_params": spec.num_params(),
            "input_bytes": sum(p.stat().st_size for p in shards),
            "generation_s": gen_s,
            "cache_mode": cache_mode,
            "cp_target_bytes": target,
            "cp_target_from": target_from,
            "expected_output_tensors": expected_tensors,
            "machine": machine,
            "results": [dataclasses.asdict(r) for r in results],
        }, indent=2) + "\n")
        print(f"\nsaved {args.json}")
    if args.clean:
        shutil.rmtree(model_dir, ignore_errors=True)
        for f in work.glob("cp-filler-*.bin"):
            f.unlink()
        print(f"removed {model_dir} and the cp filler")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
