"""DELLA's rescale-pass kernel (composer.native.della_pass), this checkout's against another revision's, in one process.

Whole-merge runs of DELLA on this machine vary by +-15% from run to run (disk, page cache, other jobs), more than
most kernel changes move them; this times the kernel alone, interleaved with the other revision's, on the merge
benchmark's own inputs (bench_merge.py generates them), and checks that both give the same packed masks and L1
lanes bit for bit. It reads a few decoder layers' task vectors (ft1 - base) into memory, cuts them into DELLA's grid
blocks (composer.methods.dare.DELLA_ELEMENTS, whole rows) and calls each kernel on every block, `--reps` times,
one thread; it prints the best time per element of each and their ratio.

    .venv/bin/python benchmarks/bench_della_kernel.py --against HEAD~1

The other revision's composer/native.py is taken with `git show` and loaded as a module of its own (its library is
built and cached as composer builds any: see composer.native). Exit status 1 where the two disagree.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = (2, 3)
MODULES = ("mlp.down_proj.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight")


def load_revision(rev: str, into: Path):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:composer/native.py"], check=True,
                            capture_output=True, text=True).stdout
    path = into / "native_other.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("native_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(workdir: Path):
    import torch
    from safetensors import safe_open

    from composer.methods.dare import DELLA_ELEMENTS
    from composer.native import LANES

    base_dir, ft_dir = workdir / "tinyllama-1.1b-random-base", workdir / "tinyllama-1.1b-random-ft1"
    names = [f"model.layers.{i}.{m}" for i in LAYERS for m in MODULES]
    out = []
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as fb, safe_open(ft_dir / shard.name, "pt") as ff:
            for name in (n for n in names if n in fb.keys()):
                x, b = ff.get_tensor(name).reshape(-1), fb.get_tensor(name).reshape(-1)
                width = ff.get_slice(name).get_shape()[-1]
                step = max(1, DELLA_ELEMENTS // width) * width
                for a in range(0, x.numel(), step):
                    n = min(step, x.numel() - a)
                    out.append((x[a: a + n], b[a: a + n], width, a, torch.zeros((n + 7) // 8, dtype=torch.uint8),
                                torch.zeros(2, LANES, dtype=torch.float64)))
    return out


def run(module, work, density: float, epsilon: float) -> tuple[float, str]:
    digest = hashlib.sha256()
    start = time.perf_counter()
    for x, b, width, a, bits, lanes in work:
        lanes.zero_()
        if not module.della_pass(x, b, width, density, epsilon, 12345 + a, bits, lanes):
            raise SystemExit("della_pass declined (no native kernels here?): nothing to time")
        digest.update(bits.numpy().tobytes())
        digest.update(lanes.numpy().tobytes())
    return time.perf_counter() - start, digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default="HEAD", help="the git revision to compare with (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("/work/bench-data-merge"),
                   help="bench_merge.py's workdir, holding its generated inputs (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=0.1)
    args = p.parse_args(argv)
    if not (args.workdir / "tinyllama-1.1b-random-ft1").is_dir():
        print(f"no inputs in {args.workdir}: run benchmarks/bench_merge.py once (it generates them)", file=sys.stderr)
        return 2

    import gc

    import torch

    from composer import native

    torch.set_num_threads(1)
    work = blocks(args.workdir)
    elements = sum(w[0].numel() for w in work)
    with tempfile.TemporaryDirectory() as tmp:
        other = load_revision(args.against, Path(tmp))
        best, digests = {"this checkout": float("inf"), args.against: float("inf")}, {}
        gc.disable()
        for _ in range(args.reps):
            for label, module in (("this checkout", native), (args.against, other)):
                seconds, digests[label] = run(module, work, args.density, args.epsilon)
                best[label] = min(best[label], seconds)
        gc.enable()
    for label, seconds in best.items():
        print(f"{label:>16}: {seconds / elements * 1e9:6.2f} ns/element (best of {args.reps}), masks {digests[label]}")
    print(f"{elements:,} elements in {len(work)} blocks; this checkout / {args.against}: "
          f"{best['this checkout'] / best[args.against]:.3f}x")
    if len(set(digests.values())) != 1:
        print("the two kernels' masks or lanes differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
