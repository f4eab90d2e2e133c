"""Cross-check against mergekit: every passthrough recipe composer runs gives mergekit's output, tensor for tensor,
and every merge method gives it bit for bit, within the output dtype's rounding (bounds derived below), or, for
the random methods (DARE, DELLA), in distribution."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import reference
from test_depth import compose
from test_methods_fusion import sce_bounds
from tinymodels import load_state_dict, logits

REPO = Path(__file__).resolve().parents[1]
HOW_TO_ENABLE = (
    "set COMPOSER_MERGEKIT to a mergekit-yaml executable, put mergekit-yaml on PATH, or install it into "
    ".venv-mergekit/ at the repo root (python -m venv .venv-mergekit && .venv-mergekit/bin/pip install "
    "torch==2.13.0 mergekit==0.1.5)"
)
ZERO_OUT = "parameters: {scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: 0.0}, {value: 1.0}]}"


def _slices(*sources: str, **top: str) -> str:
    """A passthrough recipe with one single-source slice per entry of `sources`; `@name` stands for a model's path."""
    lines = ["merge_method: passthrough", *(f"{key}: {value}" for key, value in top.items()), "slices:"]
    return "\n".join(lines + [f"  - sources: [{{{source}}}]" for source in sources]) + "\n"


def _dus(model: str, dtype: str | None) -> str:
    return _slices(f"model: @{model}, layer_range: [0, 3]", f"model: @{model}, layer_range: [1, 4]",
                   **({"dtype": dtype} if dtype else {}))


def _llama_pro(model: str) -> str:
    return _slices(*(f"model: @{model}, layer_range: [{a}, {b}]{extra}"
                     for a, b, extra in ((0, 2, ""), (1, 2, f", {ZERO_OUT}"), (2, 4, ""), (3, 4, f", {ZERO_OUT}"))))


def _precedence(model: str) -> str:
    """Gradients, and a `scale` set at source, slice and global level for the same tensors (source wins)."""
    return f"""\
merge_method: passthrough
dtype: float16
out_dtype: bfloat16
parameters:  # global: only what neither the source nor the slice sets
  scale:
    - {{filter: mlp, value: 7.0}}
    - {{filter: proj, value: 5.0}}
    - {{filter: norm, value: 2.0}}
    - {{filter: embed, value: 0.5}}
slices:
  - sources:
      - model: @{model}
        layer_range: [0, 4]
        parameters: {{scale: [{{filter: mlp, value: [1.0, 0.5]}}]}}
    parameters: {{scale: [{{filter: self_attn, value: [0.25, 1.5, 3.0]}}, {{filter: mlp, value: 9.0}}]}}
  - sources: [{{model: @{model}, layer_range: [3, 4]}}]
"""


CASES = {
    **{f"dus-{m}-{d or 'as-is'}": _dus(m, d) for m in ("llama", "mistral", "qwen2") for d in (None, "bfloat16")},
    **{f"dus-llama-bf16-{d or 'as-is'}": _dus("llama-bf16", d) for d in (None, "float16")},
    **{f"llama-pro-{m}": _llama_pro(m) for m in ("llama", "mistral", "qwen2")},
    **{f"precedence-{m}": _precedence(m) for m in ("mistral", "qwen2")},
    **{f"models-{m}-{d}": f"merge_method: passthrough\nout_dtype: {d}\nmodels: [{{model: @{m}}}]\n"
       for m, d in (("qwen2", "bfloat16"), ("mistral", "float16"), ("llama-bf16", "float32"))},
    "two-models-base-last": _slices("model: @llama, layer_range: [0, 2]", "model: @llama-b, layer_range: [1, 4]",
                                    base_model="@llama-b"),
    "two-models-base-first": _slices("model: @llama-b, layer_range: [0, 3]", "model: @llama, layer_range: [2, 4]",
                                     base_model="@llama-b"),
}

# Runs every (recipe, out) pair through the mergekit-yaml script itself, in one interpreter, so that mergekit's
# import (~10 s) is paid once rather than per recipe; a failed run leaves its traceback in OUT.err.
DRIVER = """
import runpy, sys, traceback
script, extra, pairs = sys.argv[1], __import__("json").loads(sys.argv[2]), sys.argv[3:]
for recipe, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = [script, recipe, out, *extra]
    __import__("torch").manual_seed(0)  # DARE/DELLA draw from torch's global generator: same masks every run
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            open(out + ".err", "w").write(f"exit status {exc.code}")
    except Exception:
        open(out + ".err", "w").write(traceback.format_exc())
"""


def find_mergekit() -> str | None:
    """COMPOSER_MERGEKIT, else mergekit-yaml on PATH, else in .venv-mergekit/ (where CI installs it)."""
    if os.environ.get("COMPOSER_MERGEKIT"):
        exe = shutil.which(os.environ["COMPOSER_MERGEKIT"])
        if exe is None:
            pytest.fail(f"COMPOSER_MERGEKIT={os.environ['COMPOSER_MERGEKIT']} is not an executable")
        return exe
    return shutil.which("mergekit-yaml") or shutil.which("mergekit-yaml", path=str(REPO / ".venv-mergekit" / "bin"))


def run_mergekit(exe: str, jobs: list[tuple[Path, Path]], args: tuple[str, ...] = ()) -> None:
    """mergekit-yaml RECIPE OUT [args] for each job, in one process where the venv's python is beside the script."""
    python = Path(exe).resolve().parent / "python"  # the interpreter of the venv that holds the script
    if python.exists():
        done = subprocess.run([str(python), "-c", DRIVER, exe, json.dumps(list(args)),
                               *(str(p) for job in jobs for p in job)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    for recipe, out in jobs:
        done = subprocess.run([exe, str(recipe), str(out), *args], capture_output=True, text=True, timeout=600)
        if done.returncode:
            Path(f"{out}.err").write_text(done.stderr)


@pytest.fixture(scope="module")
def mergekit() -> str:
    exe = find_mergekit()
    if exe is None:
        # CI installs mergekit, so there a skip would mean the cross-check silently did not run.
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"mergekit not found: {HOW_TO_ENABLE}")
    return exe


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every case's recipe (with real paths) and mergekit's output folder for it."""
    root = tmp_path_factory.mktemp("mergekit")
    jobs = {}
    for case, text in {**CASES, **{f"merge-{name}": text for name, (text, _) in MERGES.items()}}.items():
        recipe = root / f"{case}.yml"
        recipe.write_text(re.sub(r"@([\w-]+)", lambda m: str(models[m.group(1)]), text))
        jobs[case] = (recipe, root / case)
    run_mergekit(mergekit, list(jobs.values()))
    return jobs


@pytest.mark.parametrize("case", CASES)
def test_same_output_as_mergekit(mergekit_outputs, tmp_path, case):
    recipe, theirs = mergekit_outputs[case]
    ours = compose(recipe, tmp_path / "out")
    # torch.equal treats mergekit's -0.0 (from x * 0.0) as equal to 0.0, as it should.
    reference.assert_same_tensors(load_state_dict(ours), load_state_dict(theirs))
    config = json.loads((ours / "config.json").read_text())
    if "layer_types" in config:
        assert len(config["layer_types"]) == config["num_hidden_layers"]
    failure = Path(f"{theirs}.err")
    if failure.exists():
        # Known mergekit 0.1.5 bug: when a recipe changes the depth of a model whose config has `layer_types`
        # (our qwen2), it writes all the weights (compared above) and then fails saving config.json, because it
        # keeps one layer_types entry per source layer. Composer rewrites layer_types: its model must load.
        assert "layer_types" in failure.read_text(), failure.read_text()
        logits(ours)
    else:
        assert json.loads((theirs / "config.json").read_text())["num_hidden_layers"] == config["num_hidden_layers"]


# ------------------------------------------------------------------------------------------------------- merges
#
# The same merge recipes give mergekit's tensors. How close depends on the recipe's `dtype` (what mergekit loads
# the inputs as and computes in):
# - float32: composer.methods is mergekit's arithmetic step for step in float32, in the same order, so linear, the
#   task-arithmetic family, ties and breadcrumbs must agree bit for bit (torch.equal). 
#   slerp, model_stock and nuslerp take their angle from float64 sums (mergekit: float32 reductions, whose bits
#   also depend on torch's thread count), so they agree within F32_ROUNDINGS below instead.
# - bfloat16: both round the inputs to bf16 first. linear and slerp compute in float32 in both tools (mergekit
#   upcasts) and round once, so linear must agree bit for bit and slerp within one bf16 rounding (coefficients a
#   few float32 ulps apart can put a value on either side of a bf16 rounding boundary). The task-arithmetic
#   family, nuslerp and
#   model_stock compute in the inputs' dtype in mergekit (every intermediate rounded to bf16, weights included:
#   0.6 becomes 0.6015625) but in float32 in composer (rounded once at the end): see BF16_ROUNDINGS.
# - ties and breadcrumbs rank |delta| by magnitude: in bf16 many deltas tie or swap rank after rounding, so the
#   kept set differs (measured: up to ~40 elements per tensor off by up to 0.07, a whole delta, not a rounding error).
#   They are compared in float32 only.
# - DARE and DELLA draw random masks from different streams: compared by distribution, not by value.


def _models(method: str, entries: list[tuple[str, str]], base: str | None = None, params: str = "") -> str:
    """A `models:` recipe; {dtype} is filled in per case. entries: (model, its per-model parameters or "")."""
    lines = [f"merge_method: {method}", "dtype: {dtype}"] + ([f"base_model: @{base}"] if base else [])
    lines += [f"parameters: {params}"] if params else []
    lines += ["models:"] + [f"  - {{model: @{m}{', parameters: ' + p if p else ''}}}" for m, p in entries]
    return "\n".join(lines) + "\n"


def _upscaled(method: str, sources: list[tuple[str, str]], base: str | None, ranges, params: str = "",
              slice_params: str = "") -> str:
    """Slices, each merging the same sources over one layer range (overlapping ranges up-scale the depth)."""
    lines = [f"merge_method: {method}", "dtype: {dtype}"] + ([f"base_model: @{base}"] if base else [])
    lines += [f"parameters: {params}"] if params else []
    lines += ["slices:"]
    for a, b in ranges:
        lines.append("  - sources:")
        lines += [f"      - {{model: @{m}, layer_range: [{a}, {b}]{', parameters: ' + p if p else ''}}}"
                  for m, p in sources]
        lines += [f"    parameters: {slice_params}"] if slice_params else []
    return "\n".join(lines) + "\n"


TWO = [("llama-b", "{weight: 0.6, density: 0.5}"), ("llama-c", "{weight: 0.4, density: 0.5}")]
# name: (recipe with {dtype}, how it is compared). "exact": bit for bit in float32 and bfloat16; "close": bit for bit
# in float32, within BF16_ROUNDINGS in bfloat16; "angles": as "close", but within F32_ROUNDINGS in float32;
# "slerp": within F32_ROUNDINGS in float32, one rounding in bfloat16;
# "float32": bit for bit, float32 only; "random": distributions; "f32-sums": within SCE_ROUNDINGS in float32, and
# one bfloat16 step more after the final rounding (bf16out).
MERGE_RECIPES = {
    "linear-normalize": (_models("linear", [("llama", "{weight: 0.7}"), ("llama-b", "{weight: 0.5}")],
                                 params="{normalize: true}"), "exact"),
    "linear-sum": (_models("linear", [("llama", "{weight: 0.7}"), ("llama-b", "{weight: 0.5}"),
                                      ("llama-c", "{weight: -0.2}")], params="{normalize: false}"), "exact"),
    "linear-qwen2": (_models("linear", [("qwen2", "{weight: 1.0}"), ("qwen2-b", "{weight: 3.0}")]), "exact"),
    "slerp-gradient": (_models("slerp", [("llama", ""), ("llama-b", "")], "llama", "{t: [0, 0.5, 1]}"), "slerp"),
    "slerp-filter": (_models("slerp", [("llama", ""), ("llama-b", "")], "llama",
                             "{t: [{filter: self_attn, value: 0.3}, {value: 0.7}]}"), "slerp"),
    "slerp-mistral": (_models("slerp", [("mistral", ""), ("mistral-b", "")], "mistral-b", "{t: 0.4}"), "slerp"),
    "nuslerp": (_models("nuslerp", [("llama", "{weight: 0.3}"), ("llama-b", "{weight: 0.7}")]), "angles"),
    "nuslerp-base": (_models("nuslerp", [("llama", ""), ("llama-b", "{weight: 0.3}"), ("llama-c", "{weight: 0.7}")],
                             "llama"), "angles"),
    "nuslerp-columns": (_models("nuslerp", [("llama", "{weight: 0.3}"), ("llama-b", "{weight: 0.7}")],
                                params="{nuslerp_flatten: false, nuslerp_row_wise: true}"), "angles"),
    "task-arithmetic": (_models("task_arithmetic", [("llama", ""), *TWO], "llama"), "close"),
    "task-arithmetic-qwen2": (_models("task_arithmetic", [("qwen2", ""), ("qwen2-b", "{weight: 0.5}")], "qwen2",
                                      "{lambda: 0.8}"), "close"),
    "model-stock": (_models("model_stock", [("llama", ""), ("llama-b", ""), ("llama-c", "")], "llama"), "angles"),
    "ties": (_models("ties", [("llama", ""), *TWO], "llama"), "float32"),
    "ties-mistral": (_models("ties", [("mistral", ""), ("mistral-b", "{weight: 1.0, density: 0.3}")], "mistral"),
                     "float32"),
    "breadcrumbs": (_models("breadcrumbs", [("llama", ""), ("llama-b", "{weight: 0.6, density: 0.8, gamma: 0.05}"),
                                            ("llama-c", "{weight: 0.4, density: 0.8, gamma: 0.05}")], "llama"),
                    "float32"),
    "breadcrumbs-ties": (_models("breadcrumbs_ties", [("llama", ""), *TWO], "llama"), "float32"),
    # values on a 1/64 grid: every cut runs through a run of equal magnitudes (see test_ranked_merge_differs_...)
    "ties-at-ties": (_models("ties", [("llama-q", ""), ("llama-b-q", "{weight: 0.6, density: 0.5}"),
                                      ("llama-c-q", "{weight: 0.4, density: 0.3}")], "llama-q"), "cut"),
    "breadcrumbs-at-ties": (_models("breadcrumbs_ties", [("llama-q", ""),
                                                         ("llama-b-q", "{weight: 0.6, density: 0.6, gamma: 0.1}"),
                                                         ("llama-c-q", "{weight: 0.4, density: 0.8, gamma: 0.05}")],
                                    "llama-q"), "cut"),
    "slices-slerp": (_upscaled("slerp", [("llama", ""), ("llama-b", "")], "llama", [(0, 3), (1, 4)],
                               "{t: [0, 0.5, 1]}"), "slerp"),
    "slices-linear": (_upscaled("linear", [("llama", "{weight: 0.25}"), ("llama-b", "{weight: 0.75}")], None,
                                [(0, 3), (1, 4)], slice_params="{normalize: false}"), "exact"),
    "slices-task-arithmetic": (_upscaled("task_arithmetic", [("llama", ""), *TWO], "llama", [(0, 2), (2, 4)],
                                         slice_params="{lambda: 0.5}"), "close"),
    "slices-ties": (_upscaled("ties", [("llama", ""), ("llama-b", "{weight: 0.6}"), ("llama-c", "{weight: 0.4}")],
                              "llama", [(0, 3), (1, 4)],
                              slice_params="{density: [{filter: mlp, value: 0.3}, {value: 0.7}]}"), "float32"),
    **{m: (_models(m, [("llama", ""), *TWO], "llama"), "random")
       for m in ("dare_linear", "dare_ties", "della", "della_linear")},
    # mergekit 0.1.5's newer methods compute in the inputs' dtype: bit for bit in float32, and in float32 rounded
    # once to bfloat16 (out_dtype); with dtype: bfloat16 mergekit rounds every intermediate, composer only the result.
    # karcher's iterations amplify float32 reductions whose last bits depend on torch's thread use: bit for bit in
    # float32 here, and within one bfloat16 step of mergekit after the final rounding (a few elements of thousands)
    "karcher": (_models("karcher", [("llama", ""), ("llama-b", ""), ("llama-c", "")]), "f32-near"),
    "karcher-base": (_models("karcher", [("llama", ""), ("llama-b", "")], "llama", "{max_iter: 3, tol: 1.0e-6}"),
                     "f32-near"),
    "multislerp": (_models("multislerp", [("llama", "{weight: 0.5}"), ("llama-b", "{weight: 0.3}"),
                                          ("llama-c", "{weight: 0.2}")]), "f32"),
    "multislerp-base": (_models("multislerp", [("llama", ""), ("llama-b", "{weight: 0.6}"),
                                               ("llama-c", "{weight: 0.4}")], "llama",
                                "{normalize_weights: false}"), "f32"),
    "nearswap": (_models("nearswap", [("llama", ""), ("llama-b", "")], "llama", "{t: 0.05}"), "f32"),
    # sce streams its weights' mean squares as float64 sums over blocks (mergekit: float32 means over the whole
    # tensor): within SCE_ROUNDINGS float32 roundings in float32, and one bfloat16 step more after the final rounding
    "sce": (_models("sce", [("llama", ""), ("llama-b", ""), ("llama-c", "")], "llama", "{select_topk: 0.5}"),
            "f32-sums"),
    "sce-all": (_models("sce", [("llama", ""), ("llama-b", "{weight: 0.9}"), ("llama-c", "{weight: 0.1}")],
                        "llama"), "f32-sums"),
    "arcee-fusion": (_models("arcee_fusion", [("llama", ""), ("llama-b", "")], "llama"), "f32"),
    "ram": (_models("ram", [("llama", ""), *[(m, "") for m, _ in TWO]], "llama", "{epsilon: 0.05}"), "f32"),
    "ramplus-tl": (_models("ramplus_tl", [("llama", ""), *[(m, "") for m, _ in TWO]], "llama",
                          "{epsilon: 0.05, r: 0.5, alpha: 0.5}"), "f32"),
}
F32_OUT = {"float32": "float32", "bf16out": "float32\nout_dtype: bfloat16"}
MERGES = {
    **{f"{name}-{dtype}": (text.replace("{dtype}", dtype), kind)
       for name, (text, kind) in MERGE_RECIPES.items() if not kind.startswith("f32")
       for dtype in (("float32", "bfloat16") if kind in ("exact", "close", "angles", "slerp") else ("float32",))},
    **{f"{name}-{label}": (text.replace("{dtype}", dtype), kind)
       for name, (text, kind) in MERGE_RECIPES.items() if kind.startswith("f32")
       for label, dtype in F32_OUT.items()},
}


# bf16 tolerance. U_BF16 is bf16's unit roundoff (8 significant bits): one rounding moves a value v by at most
# |v| * 2^-8 (half an ulp). With the inputs x_0 (the base, where there is one), x_1, ... already rounded to bf16 in
# both tools, every intermediate of these methods is bounded elementwise by S = sum|x_i| + sum_{i>0}|x_i - x_0|
# (all weights, t and lambda here are <= 1 in size). Composer rounds once (its float32 result to bf16); mergekit
# rounds each intermediate to bf16: task arithmetic ~6 times (x_i - base, the weight itself - 0.6 is stored as
# 0.6015625 -, w * delta, the sum over models, lambda, base + mixed); nuslerp ~7 (the unit vectors, cos, the two
# sin coefficients, each product, their sum over sin(theta), + base); model_stock ~6 (the offsets, cos, t,
# t * avg, (1 - t) * base, their sum). So |composer - mergekit| <= BF16_ROUNDINGS * U_BF16 * S elementwise, with
# BF16_ROUNDINGS = 8 covering the longest chain plus composer's own rounding. (Observed: at most 2.4.)
U_BF16 = 2.0**-8
BF16_ROUNDINGS = 8
# float32 tolerance of the "angles" methods (model_stock, nuslerp flattened or per column) and slerp. composer
# streams their angles from float64 sums over blocks; mergekit reduces whole float32 tensors, so its cosine is off
# by a few float32 ulps (a sum of n float32 terms errs by up to ~log2(n) roundings with torch's pairwise reduction).
# That error reaches the output through the interpolation coefficients (t for model_stock; sin((1-t)θ)/sin θ
# and sin(tθ)/sin θ for nuslerp and slerp, whose sensitivity to cos is at most ~1/sin^2 θ, ~1 for these
# unrelated random models),
# on top of the two tools' identical elementwise roundings: |composer - mergekit| <= F32_ROUNDINGS * U_F32 * S
# elementwise, S as above. (Observed: at most 2.9 for nuslerp, 1.9 for slerp.)
U_F32 = 2.0**-24
F32_ROUNDINGS = 16
# slerp in bfloat16: both tools compute in float32 and round once, with coefficients a few float32 ulps apart, so
# a value can land on the other side of a bf16 rounding boundary: one bf16 ulp, at most 2 * U_BF16 * |value|.
SLERP_BF16 = 2
# sce ("f32-sums"): its per-model weights are mean squares of the task vectors over the whole tensor; composer
# streams them as float64 sums over blocks, rounded once (within 2 roundings of exact), mergekit takes torch's
# float32 mean (its cascade sum: measured within 2.3 roundings). The weights' common scale cancels in the weighted
# mean, so the output moves by the spread of their own errors times |d_i - merged| <= S, plus each side's few
# elementwise roundings: 25 roundings of S in all (derived in test_methods_fusion.sce_bounds; observed: 1.4).
SCE_ROUNDINGS = sce_bounds(2)[2]


def _pair(mergekit_outputs, tmp_path, case: str) -> tuple[dict, dict, Path]:
    recipe, theirs = mergekit_outputs[f"merge-{case}"]
    failure = Path(f"{theirs}.err")
    assert not failure.exists(), failure.read_text()
    ours, theirs_sd = load_state_dict(compose(recipe, tmp_path / "out")), load_state_dict(theirs)
    assert sorted(ours) == sorted(theirs_sd)
    for name, t in theirs_sd.items():
        assert (ours[name].dtype, ours[name].shape) == (t.dtype, t.shape), name
    return ours, theirs_sd, recipe


def _differences(ours: dict, theirs: dict) -> dict[str, str]:
    return {name: f"max |diff| {(ours[name].float() - t.float()).abs().max().item():.3g} in "
                  f"{(ours[name] != t).sum().item()}/{t.numel()} elements"
            for name, t in theirs.items() if not torch.equal(ours[name], t)}


@pytest.mark.parametrize("case", [c for c, (_, kind) in MERGES.items()
                                  if kind in ("exact", "float32", "f32") or (kind in ("close", "f32-near") and c.endswith("float32"))])
def test_merge_bit_identical_to_mergekit(mergekit_outputs, tmp_path, case):
    ours, theirs, _ = _pair(mergekit_outputs, tmp_path, case)
    assert not _differences(ours, theirs), _differences(ours, theirs)


def _input_name(text: str, name: str) -> str:
    """The inputs' tensor that an output tensor is merged from: in a `slices:` recipe, output layer i is layer i of
    the slices' layer ranges laid end to end."""
    ranges = [re.search(r"layer_range: \[(\d+), (\d+)\]", s) for s in text.split("- sources:")[1:]]
    layers = [i for r in ranges for i in range(int(r[1]), int(r[2]))]
    return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{layers[int(m[1])]}.", name) if layers else name


@pytest.mark.parametrize("case", [c for c, (_, kind) in MERGES.items()
                                  if kind in ("close", "angles", "slerp")
                                  and (c.endswith("bfloat16") or kind != "close")])
def test_merge_within_rounding_of_mergekit(mergekit_outputs, models, tmp_path, case):
    ours, theirs, recipe = _pair(mergekit_outputs, tmp_path, case)
    names = list(dict.fromkeys(re.findall(r"@([\w-]+)", MERGE_RECIPES[case.rsplit("-", 1)[0]][0])))
    inputs = [load_state_dict(models[m]) for m in names]  # base first where there is one
    bf16 = case.endswith("bfloat16")
    kind = MERGES[case][1]
    unit, allowed = (U_BF16, SLERP_BF16 if kind == "slerp" else BF16_ROUNDINGS) if bf16 else (U_F32, F32_ROUNDINGS)
    worst = 0.0
    for name, t in theirs.items():
        source = _input_name(recipe.read_text(), name)
        xs = [sd[source].to(torch.bfloat16 if bf16 else torch.float32).float() for sd in inputs]
        scale = sum(x.abs() for x in xs) + sum((x - xs[0]).abs() for x in xs[1:])
        diff = (ours[name].float() - t.float()).abs()
        worst = max(worst, (diff / (unit * scale)).max().item())
    assert worst <= allowed, f"{case}: off by {worst:.2f} roundings (allowed {allowed})"



@pytest.mark.parametrize("case", [c for c, (_, kind) in MERGES.items() if kind == "f32-near" and c.endswith("bf16out")])
def test_merge_within_one_bf16_step_of_mergekit(mergekit_outputs, tmp_path, case):
    """karcher in float32 rounded once to bf16: the two tools' float32 results differ by a few float32 roundings of
    the tensor's scale (its reductions' last bits depend on torch's threads), so a value may round to the next bf16
    step: at most one step of its size, plus F32_ROUNDINGS float32 roundings of the largest value (near zero)."""
    ours, theirs, _ = _pair(mergekit_outputs, tmp_path, case)
    for name, t in theirs.items():
        a, b = ours[name].float(), t.float()
        step = 2 * U_BF16 * torch.maximum(a.abs(), b.abs()) + F32_ROUNDINGS * U_F32 * b.abs().max()
        assert ((a - b).abs() <= step).all(), (name, ((a - b).abs() / step).max())
        assert (a != b).float().mean() < 0.01, name  # a few elements, not a different merge


@pytest.mark.parametrize("case", [c for c, (_, kind) in MERGES.items() if kind == "f32-sums"])
def test_merge_within_the_weights_rounding_of_mergekit(mergekit_outputs, models, tmp_path, case):
    """sce in float32: within SCE_ROUNDINGS roundings of S (as above) of mergekit, elementwise; rounded once to
    bf16 (bf16out), a value within that of mergekit's may round to the next bf16 step: one step of its size more."""
    ours, theirs, recipe = _pair(mergekit_outputs, tmp_path, case)
    names = list(dict.fromkeys(re.findall(r"@([\w-]+)", MERGE_RECIPES[case.rsplit("-", 1)[0]][0])))
    inputs = [load_state_dict(models[m]) for m in names]  # the base first
    for name, t in theirs.items():
        xs = [sd[_input_name(recipe.read_text(), name)].float() for sd in inputs]
        scale = sum(x.abs() for x in xs) + sum((x - xs[0]).abs() for x in xs[1:])
        a, b = ours[name].float(), t.float()
        step = 2 * U_BF16 * torch.maximum(a.abs(), b.abs()) if case.endswith("bf16out") else 0
        assert ((a - b).abs() <= SCE_ROUNDINGS * U_F32 * scale + step).all(), (name, ((a - b).abs() / scale).max())
        if case.endswith("bf16out"):
            assert (a != b).float().mean() < 0.01, name  # a few elements, not a different merge


@pytest.mark.parametrize("case", [c for c, (_, kind) in MERGES.items() if kind == "cut"])
def test_ranked_merge_differs_from_mergekit_only_at_the_cut(mergekit_outputs, models, tmp_path, case):
    """TIES and Breadcrumbs where the magnitude cut runs through runs of equal |delta|: mergekit's unstable argsort
    keeps an arbitrary subset of the tied run, composer the earliest elements (flat index order). So the outputs
    may differ, but only at elements where some model's |delta| equals one of that model's cut values (the
    smallest kept, and with gamma the largest kept); everywhere else they are bit for bit the same."""
    from composer.methods.sparsify import kept_range

    ours, theirs, _ = _pair(mergekit_outputs, tmp_path, case)
    entries = re.findall(r"\{model: @([\w-]+)(?:, parameters: \{([^}]*)\})?\}", MERGE_RECIPES[case.rsplit("-", 1)[0]][0])
    (base_name, _), *others = entries
    base = load_state_dict(models[base_name])
    params = [dict((k.strip(), float(v)) for k, v in (kv.split(":") for kv in text.split(","))) for _, text in others]
    inputs = [load_state_dict(models[m]) for m, _ in others]
    differ = tied_cuts = 0
    for name, t in theirs.items():
        at_cut = torch.zeros(t.numel(), dtype=torch.bool)
        for sd, p in zip(inputs, params):
            magnitude = (sd[name] - base[name]).abs().reshape(-1)
            start, end = kept_range(magnitude.numel(), p["density"], p.get("gamma")) or (0, magnitude.numel())
            ordered = magnitude.sort(descending=True).values
            cuts = [ordered[end - 1]] + ([ordered[start]] if start else [])
            tied_cuts += sum(int((magnitude == c).sum()) > 1 for c in cuts)
            for c in cuts:
                at_cut |= magnitude == c
        different = (ours[name] != t).reshape(-1)
        assert not (different & ~at_cut).any(), f"{name}: differs from mergekit away from the cut"
        differ += int(different.sum())
    assert tied_cuts > len(theirs), "the fixture should put most cuts inside runs of equal magnitudes"
    assert differ > 0, "with tied cuts the two tools' tie rules should keep different elements somewhere"


@pytest.mark.parametrize("case", [c for c, (_, kind) in MERGES.items() if kind == "random"])
def test_random_merge_distributed_as_mergekit(mergekit_outputs, models, tmp_path, case):
    """DARE / DELLA masks come from different random streams (mergekit: torch's global generator, seeded to 0 by
    DRIVER; composer: a generator per tensor seeded from its name), so compare what the masks do, not bits.

    Each model keeps a delta element with probability 0.5 (DELLA: 0.5 on average over a row), so the output equals
    the base where every model's element was dropped (~0.25 here). Per tensor of n >= 4096 elements:
    - that fraction is a mean of n Bernoulli draws: std <= sqrt(0.25 / n) per tool, so the two tools' fractions
      differ by at most 4 * sqrt(0.5 / n) (4 sigma: 0.044 at n = 4096) if they draw from the same distribution;
    - the mean of (output - base) has std = std(output - base) / sqrt(n) per tool: allowed 5 * sqrt(2 / n) stds;
    - the sample std of (output - base) errs by ~sqrt((kurtosis - 1) / 4n) relative, ~2% at n = 4096 for these
      sparse deltas: allowed 10%;
    - which elements are dropped: the mean of r = sum_i |x_i - base| over the dropped elements, over its mean over
      all, is ~1 for DARE (uniform drop) and ~0.83 for DELLA (small deltas dropped more often). It averages ~n/4
      values of coefficient of variation ~0.6: std ~0.6 / sqrt(n / 4) <= 0.019 per tool, allowed 0.12 (~4.5 sigma).
      (DELLA with its rank probabilities reversed gives 1.14.)
    Observed (torch 2.13, seeds above): fractions within 0.021, means within 0.05 std, stds within 2.6%, drop
    magnitudes within 0.033.
    Both tools are seeded, so the outcome is fixed: these bounds cannot flake, they only say what is expected.
    """
    ours, theirs, _ = _pair(mergekit_outputs, tmp_path, case)
    inputs = [load_state_dict(models[m]) for m in ("llama", "llama-b", "llama-c")]
    base = inputs[0]
    checked = 0
    for name, t in theirs.items():
        n = t.numel()
        if n < 4096:
            continue
        checked += 1
        stats = []
        for out in (ours[name], t):
            delta = out - base[name]
            stats.append(((delta == 0).float().mean().item(), delta.mean().item(), delta.std().item()))
        (dropped_ours, mean_ours, std_ours), (dropped_theirs, mean_theirs, std_theirs) = stats
        assert 0.1 < dropped_theirs < 0.5, (name, stats)  # the masks do drop some, not all, of the deltas
        assert abs(dropped_ours - dropped_theirs) < 4 * (0.5 / n) ** 0.5, (name, stats)
        assert abs(mean_ours - mean_theirs) < 5 * (2 / n) ** 0.5 * std_theirs, (name, stats)
        assert abs(std_ours / std_theirs - 1) < 0.1, (name, stats)
        r = sum((sd[name] - base[name]).abs() for sd in inputs[1:])
        ours_r, theirs_r = ((r[out == base[name]].mean() / r.mean()).item() for out in (ours[name], t))
        assert abs(ours_r - theirs_r) < 0.12, (name, ours_r, theirs_r)
    assert checked >= 20


def test_every_registered_method_has_a_formula_test_and_a_cross_check():
    """Registering a method without its formula test (a call of its function in tests/test_methods*.py) or without
    a mergekit cross-check case here fails."""
    from composer.methods import REGISTRY

    formula_tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_methods*.py"))
    for method in REGISTRY:
        assert re.search(rf"\b{method.name}\(", formula_tests), f"{method.name} has no formula test"
        assert any(f"merge_method: {method.name}\n" in text for text, _ in MERGE_RECIPES.values()), \
            f"{method.name} has no mergekit cross-check case"


@pytest.mark.parametrize("method, params", [("arcee_fusion", ""), ("ramplus_tl", "{epsilon: 0.05, r: 0.5, alpha: 0.5}")])
def test_bf16_recipe_writes_bf16_where_mergekit_writes_float32(mergekit, models, tmp_path, method, params):
    """A stated difference (README, "Equivalence with mergekit"): with `dtype: bfloat16` and no `out_dtype`,
    mergekit 0.1.5 writes arcee_fusion's and ramplus_tl's tensors as float32 (their float32 mask or lambdas promote
    its bfloat16 arithmetic); composer writes the recipe's dtype, as for every method, and `out_dtype: float32`
    gives mergekit's dtype. (The values are not compared: in bfloat16 mergekit computes the importances, the
    gate and the counts' inputs from bfloat16 intermediates, so it keeps other elements; the float32 cases of
    test_merge_bit_identical_to_mergekit compare them bit for bit.)"""
    entries = [("llama", ""), ("llama-b", "")] + ([("llama-c", "")] if method == "ramplus_tl" else [])
    text = re.sub(r"@([\w-]+)", lambda m: str(models[m.group(1)]),
                  _models(method, entries, "llama", params).replace("{dtype}", "bfloat16"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    run_mergekit(mergekit, [(recipe, tmp_path / "theirs")])
    theirs = load_state_dict(tmp_path / "theirs")
    ours = load_state_dict(compose(recipe, tmp_path / "ours"))
    assert sorted(ours) == sorted(theirs)
    assert {t.dtype for t in theirs.values()} == {torch.float32}
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    recipe.write_text(text + "out_dtype: float32\n")
    wide = load_state_dict(compose(recipe, tmp_path / "wide"))
    assert {t.dtype for t in wide.values()} == {torch.float32}
