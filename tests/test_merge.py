"""Merges through the engine: every merged tensor equals its method applied to the loaded inputs, with parameters
resolved per tensor as mergekit resolves them; bad merge recipes fail cleanly."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from composer.cli import main
from composer.methods import METHODS, slerp
from tinymodels import load_state_dict, logits, plain_uniform

F32 = "dtype: float32\n"


def run(recipe, out, *args) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", *args])
    assert result.exit_code == 0, result.output
    return load_state_dict(out)


def layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if ".layers." in name else None


def test_linear_models_form(models, write_recipe, tmp_path):
    a, b = models["llama"], models["llama-b"]
    out = run(write_recipe(f"""merge_method: linear
{F32}models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: [{{filter: mlp, value: 2.0}}, {{value: 0.7}}]}}
"""), tmp_path / "out")
    sa, sb = load_state_dict(a), load_state_dict(b)
    for name, value in out.items():
        wb = 2.0 if "mlp" in name else 0.7
        assert torch.equal(value, METHODS["linear"].apply([sa[name], sb[name]], per_input={"weight": [0.3, wb]})), name
    logits(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "tags:\n- composer\n- merge\n- linear" in card and "arxiv.org/abs/2203.05482" in card


def test_slerp_gradient_per_layer(models, write_recipe, tmp_path):
    """t is a gradient over the 4 layers (t = layer/3 along [0, 1]); embeddings and head take t at 0."""
    a, b = models["llama"], models["llama-b"]
    out = run(write_recipe(f"""merge_method: slerp
base_model: {a}
{F32}parameters:
  t:
    - {{filter: self_attn, value: [0.0, 1.0]}}
    - {{value: 0.25}}
models: [{{model: {a}}}, {{model: {b}}}]
"""), tmp_path / "out")
    sa, sb = load_state_dict(a), load_state_dict(b)
    for name, value in out.items():
        layer = layer_of(name)
        t = (layer / 3 if layer is not None else 0.0) if "self_attn" in name else 0.25
        assert torch.equal(value, slerp(sa[name], sb[name], t)), name
    prov = json.loads((tmp_path / "out" / "composer_provenance.json").read_text())
    assert prov["tensors"]["model.layers.2.self_attn.q_proj.weight"]["params"] == {"t": 2 / 3}
    assert prov["tensors"]["model.layers.2.self_attn.q_proj.weight"]["base"] == str(a)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_task_vector_methods(models, write_recipe, tmp_path, method):
    base, a, b = models["llama"], models["llama-b"], models["llama-bf16"]
    out = run(write_recipe(f"""merge_method: {method}
base_model: {base}
{F32}parameters: {{density: 0.5}}
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4, density: [{{filter: mlp, value: 0.8}}]}}
"""), tmp_path / "out")
    sd = [load_state_dict(p) for p in (base, a, b)]
    spec = METHODS[method]
    for name, value in out.items():
        x = [s[name].to(torch.float32) for s in sd]
        expected = spec.apply(x[1:], base=x[0], per_input={
            "weight": [0.6, 0.4], "density": [0.5, 0.8 if "mlp" in name else 0.5]})
        assert torch.equal(value, expected), name


def test_model_stock_three_models(models, write_recipe, tmp_path):
    base, a, b = models["llama"], models["llama-b"], models["llama-bf16"]
    out = run(write_recipe(f"merge_method: model_stock\nbase_model: {base}\n{F32}"
                           f"models: [{{model: {a}}}, {{model: {b}}}]\n"), tmp_path / "out")
    sd = [load_state_dict(p) for p in (base, a, b)]
    for name, value in out.items():
        x = [s[name].to(torch.float32) for s in sd]
        offsets = [(y - x[0]).double().flatten() for y in x[1:]]
        cos = torch.dot(*offsets) / (offsets[0].norm() * offsets[1].norm())
        t = 2 * cos / (1 + cos)
        mean_part, base_part = t * (x[1].double() + x[2].double()) / 2, (1 - t) * x[0].double()
        # streamed: the angle from float64 sums, so what separates it from the formula is float32 rounding: of t
        # and of the blend's few steps, each at most 2^-24 of the terms' size (8 such roundings allowed)
        scale = 2**-24 * (mean_part.abs() + base_part.abs())
        error = (value.double() - (mean_part + base_part)).abs()
        assert (error <= 8 * scale).all(), (name, (error / scale).max())
        # mergekit's whole-tensor float32 arithmetic (METHODS) sums the angle in float32: its t is off by a few
        # ulps (measured: 2), which moves each term by as many units of 2^-24 of its size: 16 allowed in all
        mergekit = METHODS["model_stock"].apply(x[1:], base=x[0])
        assert ((value - mergekit).abs() <= 16 * scale).all(), (name, ((value - mergekit).abs() / scale).max())


@pytest.mark.parametrize(("shape_params", "mode"), [
    ("", "statistics"),  # flattened: one angle per tensor
    ("parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n", "column statistics"),  # one angle per column
])
@pytest.mark.parametrize("with_base", [False, True])
def test_streamed_nuslerp_equals_the_whole_tensor_formula(models, write_recipe, tmp_path, with_base, monkeypatch,
                                                          shape_params, mode):
    """Flattened and per-column nuslerp stream their angles (float64 sums over blocks of ranked.BLOCK elements,
    per column for the latter) and never hold a tensor whole; the result is nuslerp's on whole tensors within the
    float32 rounding of its coefficients. Small blocks and chunks cut rows in the middle."""
    import sys

    from composer import ranked
    from composer.tensorplan import merge_mode

    base, a, b = models["llama"], models["llama-b"], models["llama-c"]
    head = f"base_model: {base}\nmodels: [{{model: {base}}}, " if with_base else "models: ["
    recipe = write_recipe(f"merge_method: nuslerp\n{F32}{shape_params}{head}{{model: {a}, parameters: {{weight: 0.3}}}}, "
                          f"{{model: {b}, parameters: {{weight: 0.7}}}}]\n")
    from composer import plan_recipe

    assert {merge_mode(t) for t in plan_recipe(recipe).tensors} == {mode}
    monkeypatch.setattr(ranked, "BLOCK", 3000)  # several blocks per tensor
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_BYTES", 3 * 4096)
    out = run(recipe, tmp_path / "out")
    sd = [load_state_dict(p) for p in (base, a, b)]
    shared = {"nuslerp_flatten": False, "nuslerp_row_wise": True} if mode == "column statistics" else {}
    for name, value in out.items():
        x = [s[name].to(torch.float32) for s in sd]
        expected = METHODS["nuslerp"].apply(x[1:], base=x[0] if with_base else None, shared=shared,
                                            per_input={"weight": [0.3, 0.7]})
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_dare_is_seeded_and_keeps_density(models, write_recipe, tmp_path):
    base, a = models["llama"], models["llama-b"]
    recipe = write_recipe(f"""merge_method: dare_linear
base_model: {base}
{F32}models: [{{model: {a}, parameters: {{weight: 1.0, density: 0.3}}}}]
""")
    one = run(recipe, tmp_path / "one", "--seed", "7")
    again = run(recipe, tmp_path / "again", "--seed", "7")
    other = run(recipe, tmp_path / "other", "--seed", "8")
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)
    sb = load_state_dict(base)
    name = "model.layers.1.mlp.up_proj.weight"
    kept = (one[name] != sb[name]).float().mean().item()
    assert abs(kept - 0.3) < 0.03  # 8192 elements: a Bernoulli(0.3) fraction within ~6 standard deviations


def test_merge_inside_slices_upscales(models, write_recipe, tmp_path):
    """SOLAR's final step in one recipe: up-scale two models and average them, slice by slice."""
    a, b = models["llama"], models["llama-b"]
    out = run(write_recipe(f"""merge_method: linear
{F32}parameters: {{weight: 0.5}}
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}, {{model: {b}, layer_range: [0, 3]}}]
  - sources: [{{model: {a}, layer_range: [1, 4]}}, {{model: {b}, layer_range: [1, 4]}}]
"""), tmp_path / "out")
    sa, sb = load_state_dict(a), load_state_dict(b)
    for out_layer, src_layer in enumerate((0, 1, 2, 1, 2, 3)):
        name = f"model.layers.{out_layer}.mlp.down_proj.weight"
        src = f"model.layers.{src_layer}.mlp.down_proj.weight"
        assert torch.equal(out[name], METHODS["linear"].apply([sa[src], sb[src]], per_input={"weight": [0.5, 0.5]}))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    logits(tmp_path / "out")


@pytest.mark.parametrize(("body", "expected"), [
    ("merge_method: slerp\nbase_model: A\nparameters: {t: 1.5}\nmodels: [{model: A}, {model: B}]\n",
     "slerp: t 1.5 for 'model.embed_tokens.weight' is outside [0, 1] (from 0 (the base model) to 1 (the other "
     "model)): use a value in [0, 1]"),
    ("merge_method: ties\nparameters: {weight: 1.0}\nmodels: [{model: A}, {model: B}]\n",
     "merge_method ties needs a base model: set base_model"),
    ("merge_method: linear\nmodels: [{model: A, parameters: {weight: 1.0}}, {model: B, parameters: {weight: -1.0}}]\n",
     "sum to 0, so normalize cannot divide by them"),
    ("merge_method: ties\nbase_model: A\nparameters: {t: 0.5, weight: 1.0}\nmodels: [{model: B}]\n",
     "unknown parameter 't' for merge_method ties"),
    ("merge_method: linear\nparameters: {wieght: 1.0}\nmodels: [{model: A}, {model: B}]\n",
     "did you mean 'weight'?"),
    ("merge_method: linear\nmodels: [{model: A}, {model: B}]\n",
     "merge_method linear needs parameter 'weight' for tensor"),
    ("merge_method: slerp\nbase_model: A\nparameters: {t: 0.5}\nmodels: [{model: A}, {model: NARROW}]\n",
     "shape mismatch"),
    ("merge_method: della\nbase_model: A\nmodels: [{model: B, parameters: {weight: 1.0, density: 0.9}}]\n",
     "della at 'model.embed_tokens.weight': density 0.9 +/- epsilon 0.15 leaves (0, 1): choose epsilon below 0.1 "
     "for model"),
])
def test_bad_merges(models, tmp_path, body, expected):
    from tinymodels import make_checkpoint

    narrow = make_checkpoint(tmp_path / "narrow", "llama", hidden_size=32, num_heads=2, num_kv_heads=1)
    text = body.replace("NARROW", str(narrow)).replace(" A", f" {models['llama']}").replace(" B", f" {models['llama-b']}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(main, [str(recipe), "--dry-run"])
    assert result.exit_code == 1, result.output
    assert expected in result.output


def test_dry_run_shows_resolved_parameters(models, write_recipe):
    a, b = models["llama"], models["llama-b"]
    recipe = write_recipe(f"""merge_method: slerp
base_model: {a}
parameters: {{t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.5}}]}}
models: [{{model: {a}}}, {{model: {b}}}]
""")
    result = CliRunner().invoke(main, [str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "  2: t=0.5 (input_layernorm, mlp, post_attention_layernorm); t=0.6667 (self_attn)" in result.output
    assert "  model.embed_tokens.weight: t=0.5\n" in result.output
    info = json.loads(CliRunner().invoke(main, [str(recipe), "--dry-run", "--json"]).output)
    layer1 = next(r for r in info["merge_parameters"] if r["layer"] == 1)
    assert {"params": "t=0.3333", "modules": ["self_attn"]} in layer1["groups"]


def test_dry_run_of_a_merge_does_not_import_torch(models, write_recipe):
    """Planning reads the method specs only: torch (~3 s to import) is loaded by the functions when they first
    run, so a dry run of any merge answers at once."""
    import subprocess
    import sys

    a, b, c = models["llama"], models["llama-b"], models["llama-c"]
    recipe = write_recipe(f"merge_method: della\nbase_model: {a}\nparameters: {{weight: 0.5, density: 0.5}}\n"
                          f"models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\n")
    script = ("import sys\nfrom composer.cli import main\n"
              f"main([{str(recipe)!r}, '--dry-run', '--json'], standalone_mode=False)\n"
              "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["merge_parameters"] and proc.stderr.strip() == "torch not loaded"


@pytest.mark.parametrize(("method", "params", "mode"), [
    ("linear", "parameters: {weight: 0.5}", "elementwise"),
    ("task_arithmetic", "parameters: {weight: 0.5}", "elementwise"),
    ("ties", "parameters: {weight: 0.5}", "elementwise"),  # density 1: no ranking, so blocks are independent
    ("ties", "parameters: {weight: 0.5, density: 0.5}", "ranked"),
    ("ties", "parameters: {weight: 0.7, density: 0.3, rescale: true}", "ranked"),
    ("breadcrumbs", "parameters: {weight: 0.5, density: 0.6, gamma: 0.1}", "ranked"),
    ("breadcrumbs_ties", "parameters: {weight: 0.5, density: 0.8, gamma: 0.05, rescale: true}", "ranked"),
    ("slerp", "parameters: {t: 0.3}", "statistics"),
])
def test_streamed_merges_equal_whole_tensor_merges(models, write_recipe, tmp_path, monkeypatch, method, params, mode):
    """Tiny blocks and chunks (and slerp's statistics steps and runs) split every tensor; the result still equals the method
    applied to whole tensors, bit for bit."""
    import sys

    from composer import ranked
    from composer.tensorplan import merge_mode

    ex, averaging = sys.modules["composer.execute"], sys.modules["composer.methods.spherical"]
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(ex, "CHUNK_BYTES", 3 * 4096)
    monkeypatch.setattr(averaging, "SLERP_CHUNK", 512)
    monkeypatch.setattr(averaging, "SLERP_RUN", 96)  # runs and a partial run per step
    monkeypatch.setattr(ranked, "BLOCK", 700)
    base, other = models["llama"], models["llama-b"]
    recipe = write_recipe(f"merge_method: {method}\nbase_model: {base}\n{F32}{params}\n"
                          f"models: [{{model: {base}}}, {{model: {other}}}]\n")
    out = run(recipe, tmp_path / "out")
    from composer import plan_recipe

    plan = plan_recipe(recipe)
    assert {merge_mode(t) for t in plan.tensors} == {mode}
    sb, so = load_state_dict(base), load_state_dict(other)
    spec, p = METHODS[method], plan.tensors[0]
    for name, value in out.items():
        if method == "slerp":
            expected = slerp(sb[name], so[name], 0.3)
        elif method == "linear":
            expected = spec.apply([sb[name], so[name]], per_input={"weight": [0.5, 0.5]})
        else:
            expected = spec.apply([so[name]], base=sb[name], shared=dict(p.params),
                                  per_input={k: [v] for k, v in p.input_params[1]})
        assert torch.equal(value, expected), name


def test_tied_and_untied_embeddings(write_recipe, tmp_path):
    """The output is tied exactly when the base config says so; a tied model's head is its embedding matrix."""
    from tinymodels import make_checkpoint

    tied = make_checkpoint(tmp_path / "tied", "qwen2")
    untied = make_checkpoint(tmp_path / "untied", "qwen2", tie_word_embeddings=False, seed=5)
    recipe = f"merge_method: linear\n{F32}parameters: {{weight: 0.5}}\nmodels: [{{model: {tied}}}, {{model: {untied}}}]\n"
    st, su = load_state_dict(tied), load_state_dict(untied)
    assert "lm_head.weight" not in st and "lm_head.weight" in su

    out = run(write_recipe(recipe + f"base_model: {untied}\n", "a.yaml"), tmp_path / "untied-out")
    head = METHODS["linear"].apply([st["model.embed_tokens.weight"], su["lm_head.weight"]],
                                   per_input={"weight": [0.5, 0.5]})
    assert torch.equal(out["lm_head.weight"], head)
    assert json.loads((tmp_path / "untied-out" / "config.json").read_text())["tie_word_embeddings"] is False
    logits(tmp_path / "untied-out")

    out = run(write_recipe(recipe + f"base_model: {tied}\n", "b.yaml"), tmp_path / "tied-out")
    assert "lm_head.weight" not in out
    assert json.loads((tmp_path / "tied-out" / "config.json").read_text())["tie_word_embeddings"] is True
    logits(tmp_path / "tied-out")


def test_streamed_dare_is_chunk_independent_and_rescaled(models, write_recipe, tmp_path, monkeypatch):
    """DARE's masks are drawn per block of a fixed grid: tiny output chunks (which split blocks anywhere, and run
    in any order on two workers) give the same bytes as the default ones; and the kept task-vector entries are
    scaled by |delta|_1 / |kept delta|_1 over the whole tensor, as DARE's rescale says."""
    import sys

    from composer import ranked

    base, other = models["llama"], models["llama-b"]
    recipe = write_recipe(f"merge_method: dare_linear\nbase_model: {base}\n{F32}"
                          f"models: [{{model: {other}, parameters: {{weight: 1.0, density: 0.4}}}}]\n")
    monkeypatch.setattr(ranked, "BLOCK", 5000)
    default = run(recipe, tmp_path / "default")
    ex = sys.modules["composer.execute"]
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", 777)
    monkeypatch.setattr(ex, "CHUNK_BYTES", 3 * 4096)
    tiny = run(recipe, tmp_path / "tiny")
    assert all(torch.equal(default[k], tiny[k]) for k in default)
    sb, so = load_state_dict(base), load_state_dict(other)
    name = "model.embed_tokens.weight"  # 16384 elements: several grid blocks
    delta = so[name] - sb[name]
    kept = default[name] != sb[name]
    assert abs(kept.float().mean().item() - 0.4) < 0.03
    factor = delta.abs().sum(dtype=torch.float64).float() / (delta * kept).abs().sum(dtype=torch.float64).float()
    torch.testing.assert_close(default[name], sb[name] + delta * kept * factor, rtol=1e-6, atol=1e-7)


def test_streamed_della_draws_per_block_of_rows(models, write_recipe, tmp_path, monkeypatch):
    """DELLA streams like DARE, its grid blocks being whole rows: tiny output chunks give the same bytes as the
    default ones, and each block's mask is MagPrune's, written plainly here (keep probability density - epsilon
    for the smallest |delta| of a row up to density + epsilon for the largest), drawn from the block's seeded
    generator; the kept entries are L1-rescaled over the whole tensor."""
    import sys

    from composer import ranked
    from composer.blocks import tensor_seed

    base, other = models["llama"], models["llama-b"]
    density, eps = 0.5, 0.2
    recipe = write_recipe(f"merge_method: della_linear\nbase_model: {base}\n{F32}models: [{{model: {other}, "
                          f"parameters: {{weight: 1.0, density: {density}, epsilon: {eps}}}}}]\n")
    monkeypatch.setattr(ranked, "BLOCK", 1000)  # 64-wide rows: blocks of 15 rows
    default = run(recipe, tmp_path / "default", "--seed", "3")
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", 777)
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_BYTES", 3 * 4096)
    tiny = run(recipe, tmp_path / "tiny", "--seed", "3")
    assert all(torch.equal(default[k], tiny[k]) for k in default)

    sb, so = load_state_dict(base), load_state_dict(other)
    name = "model.embed_tokens.weight"
    delta = so[name] - sb[name]
    rows, width = delta.shape
    per_block = 1000 // width
    mask = torch.empty_like(delta)
    for g, r in enumerate(range(0, rows, per_block)):
        d = delta[r: r + per_block]
        rank = d.abs().argsort(dim=1).argsort(dim=1).float()  # 0 = the smallest |delta| of its row
        probs = density - eps + 2 * eps * rank / (width - 1)
        mask[r: r + per_block] = (plain_uniform(probs.shape, torch.Generator().manual_seed(
            tensor_seed(3, f"{name}:0:{g}"))) < probs).float()
    factor = delta.abs().sum(dtype=torch.float64).float() / (delta * mask).abs().sum(dtype=torch.float64).float()
    torch.testing.assert_close(default[name], sb[name] + delta * mask * factor, rtol=1e-6, atol=1e-7)
    assert not torch.equal(default[name], run(recipe, tmp_path / "other", "--seed", "4")[name])


@pytest.mark.parametrize(("method", "params"), [("model_stock", "filter_wise: true"),
                                                ("nuslerp", "nuslerp_flatten: false")])
def test_row_methods_stream_by_blocks_of_rows(models, write_recipe, tmp_path, monkeypatch, method, params):
    """model_stock per row and nuslerp per row compute each row on its own, so blocks of whole rows (small
    blocks and chunks here, which split rows across chunks) give the whole-tensor method's bytes."""
    import sys

    from composer import plan_recipe, ranked
    from composer.tensorplan import merge_mode

    base, a, b = models["llama"], models["llama-b"], models["llama-c"]
    weights = ", parameters: {weight: 0.4}" if method == "nuslerp" else ""
    recipe = write_recipe(f"merge_method: {method}\nbase_model: {base}\n{F32}parameters: {{{params}}}\n"
                          f"models: [{{model: {base}}}, {{model: {a}{weights}}}, {{model: {b}{weights}}}]\n")
    assert {merge_mode(t) for t in plan_recipe(recipe).tensors} == {"rows"}
    monkeypatch.setattr(ranked, "BLOCK", 1000)
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_BYTES", 3 * 4096)
    out = run(recipe, tmp_path / "out")
    sd = [load_state_dict(p) for p in (base, a, b)]
    shared = {"filter_wise": True} if method == "model_stock" else {"nuslerp_flatten": False}
    per_input = {"weight": [0.4, 0.4]} if method == "nuslerp" else {}
    for name, value in out.items():
        x = [s[name].to(torch.float32) for s in sd]
        assert torch.equal(value, METHODS[method].apply(x[1:], base=x[0], shared=shared, per_input=per_input)), name


@pytest.mark.parametrize(("body", "expected"), [
    ("merge_method: ties\nbase_model: A\nmodels: [{model: A}, {model: B, parameters: {weight: 1.0, density: -0.5}}]\n",
     "ties: density -0.5 of model"),
    ("merge_method: ties\nbase_model: A\nmodels: [{model: A}, {model: B, parameters: {weight: 1.0, density: 1.5}}]\n",
     "is outside [0, 1] (the fraction of the task vector kept): use a value in [0, 1]"),
    ("merge_method: dare_ties\nbase_model: A\nmodels: [{model: A}, {model: B, parameters: {weight: -1.0}}]\n",
     "dare_ties: weight -1 of model"),
    ("merge_method: nearswap\nbase_model: A\nparameters: {t: 1.5}\nmodels: [{model: A}, {model: B}]\n",
     "nearswap: t 1.5 for 'model.embed_tokens.weight' is outside [0, 1]"),
    ("merge_method: sce\nbase_model: A\nparameters: {select_topk: 0}\nmodels: [{model: A}, {model: B}]\n",
     "sce: select_topk 0 for 'model.embed_tokens.weight' is outside (0, 1]"),
    ("merge_method: sce\nbase_model: A\nparameters: {select_topk: 1.2}\nmodels: [{model: A}, {model: B}]\n",
     "is outside (0, 1]"),
    ("merge_method: karcher\nparameters: {max_iter: 2.5}\nmodels: [{model: A}, {model: B}]\n",
     "parameter max_iter for 'model.embed_tokens.weight' is 2.5: it must be a whole number"),
    ("merge_method: arcee_fusion\nbase_model: A\nmodels: [{model: A}, {model: B}, {model: A2}]\n", "takes 2 models"),
    ("merge_method: ties\nbase_model: A\nparameters: {density: [{pattern: mlp, value: 0.5}]}\n"
     "models: [{model: A}, {model: B, parameters: {weight: 1.0}}]\n", "write 'filter:' instead"),
])
def test_meaningless_parameters_are_refused(models, tmp_path, body, expected):
    """Values mergekit accepts silently but that mean nothing are refused at plan time, naming the model and the
    range; nothing is written."""
    text = (body.replace(" A2", f" {models['llama-c']}").replace(" A", f" {models['llama']}")
            .replace(" B", f" {models['llama-b']}"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_sce_weight_is_accepted_and_ignored_with_a_note(models, write_recipe, tmp_path):
    """mergekit 0.1.5's sce has no weight and ignores one: composer gives the same tensors and says so."""
    base, a, b = models["llama"], models["llama-b"], models["llama-c"]
    plain = f"merge_method: sce\nbase_model: {base}\n{F32}models: [{{model: {base}}}, {{model: {a}}}, {{model: {b}}}]\n"
    weighted = plain.replace(f"{{model: {a}}}", f"{{model: {a}, parameters: {{weight: 0.9}}}}")
    result = CliRunner().invoke(main, [str(write_recipe(weighted, "w.yaml")), "--dry-run"])
    assert result.exit_code == 0 and "sce ignores 'weight', as mergekit 0.1.5 does" in result.output, result.output
    one, two = run(write_recipe(plain, "p.yaml"), tmp_path / "p"), run(write_recipe(weighted, "w.yaml"), tmp_path / "w")
    assert all(torch.equal(one[k], two[k]) for k in one)
