"""Mixtures of experts from dense models (mergekit-moe recipes): tensor for tensor against mergekit-moe 0.1.5, loaded
by transformers as the MoE class, and the identity oracle: experts identical to the base give the base's logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

import test_mergekit
from composer.cli import main
from test_mergekit import run_mergekit
from tinymodels import DEFAULT_INPUT_IDS, load_state_dict, logits, make_checkpoint, save_random

mergekit = test_mergekit.mergekit
PROMPTS = {  # expert -> (positive, negative)
    0: (["hello world", "the cat is on the mat"], ["a dog"]),
    1: (["she said what"], None),
    2: (["what is it", "this one"], ["that"]),
}


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    made = {f"l{k}": make_checkpoint(root / f"l{k}", "llama", seed=50 + k) for k in range(3)}
    made["m0"] = make_checkpoint(root / "m0", "mistral", seed=60)
    made["m1"] = make_checkpoint(root / "m1", "mistral", seed=61)
    made["q0"] = make_checkpoint(root / "q0", "qwen2", seed=62)
    made["q1"] = make_checkpoint(root / "q1", "qwen2", seed=63)
    qwen3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128)
    for k in range(2):
        made[f"k{k}"] = save_random(root / f"k{k}", lambda: transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**qwen3)), seed=70 + k)
    made["wide"] = make_checkpoint(root / "wide", "llama", seed=64, intermediate_size=96)
    return made


def moe_recipe(base: Path, models: list[Path], gate_mode: str = "cheap_embed", *, shared: Path | None = None,
               dtype: str = "float32", extra: str = "") -> str:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", f"dtype: {dtype}", "experts_per_token: 2", "experts:"]

    def expert(model: Path, k: int, indent: str = "  ") -> list[str]:
        pos, neg = PROMPTS[k % 3]
        out = [f"{indent}- source_model: {model}", f"{indent}  positive_prompts: {json.dumps(pos)}"]
        return out + ([f"{indent}  negative_prompts: {json.dumps(neg)}"] if neg else [])

    for k, m in enumerate(models):
        lines += expert(m, k)
    if shared is not None:
        lines += ["shared_experts:", *expert(shared, 2)]
    return "\n".join(lines) + "\n" + extra


def compose(recipe: Path, out: Path, *args: str):
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", *args])
    assert result.exit_code == 0, result.output
    return load_state_dict(out)


def _mergekit_moe(mergekit: str) -> str:
    return str(Path(mergekit).resolve().parent / "mergekit-moe")


CASES = {  # case -> (base, experts, gate_mode, shared, extra recipe text, mergekit args, router bound in ulps)
    "mixtral-llama-cheap_embed": ("l0", ["l1", "l2", "l0"], "cheap_embed", None, "", (), 0),
    "mixtral-llama-hidden": ("l0", ["l1", "l2"], "hidden", None, "", (), 0),
    "mixtral-mistral-random": ("m0", ["m0", "m1"], "random", None, "", ("--random-seed", "7"), 0),
    "mixtral-noise-residual": ("l0", ["l1", "l2"], "cheap_embed", None, "", (), 0),
    "qwen-moe-shared": ("q0", ["q0", "q1"], "cheap_embed", "q1", "", (), 0),
    "qwen-moe-from-llama": ("l0", ["l1", "l2"], "hidden", "l0", "architecture: qwen\n", (), 0),
    "qwen3-moe": ("k0", ["k0", "k1"], "cheap_embed", None, "", (), 0),
}


@pytest.fixture(scope="module")
def theirs(mergekit, experts, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("moe-mergekit")
    made = {}
    by_args: dict[tuple, list] = {}
    for case, (base, models, mode, shared, extra, args, _) in CASES.items():
        text = moe_recipe(experts[base], [experts[m] for m in models], mode,
                          shared=experts[shared] if shared else None, extra=extra)
        recipe = root / f"{case}.yml"
        recipe.write_text(text)
        made[case] = (recipe, root / case)
        by_args.setdefault(args, []).append(made[case])
    for args, jobs in by_args.items():
        run_mergekit(_mergekit_moe(mergekit), jobs, args)
    for case, (_, out) in made.items():
        assert not Path(f"{out}.err").exists(), (case, Path(f"{out}.err").read_text()[-2000:])
    return made


@pytest.mark.parametrize("case", [c for c in CASES if c != "mixtral-noise-residual"])
def test_same_tensors_as_mergekit_moe(theirs, tmp_path, case):
    """Every tensor equals mergekit-moe's: experts stacked in its layout, base tensors, and the routers (cheap_embed
    and hidden computed as mergekit-moe computes them; random from the same seed); config.json equals its own."""
    recipe, ref_dir = theirs[case]
    seed = ("--seed", "7") if "random" in case else ()
    ours = compose(recipe, tmp_path / "o", *seed)
    ref = load_state_dict(ref_dir)
    assert ours.keys() == ref.keys()
    for name in ours:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name
    mine, their_config = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "o", ref_dir))
    if "sliding_attention" in their_config.get("layer_types", []):  # the one difference, on purpose (README)
        assert their_config["sliding_window"] is None and set(mine.pop("layer_types")) == {"full_attention"}
        their_config.pop("layer_types")
    assert mine == their_config


def test_noise_and_residual_scale(experts, tmp_path):
    """noise_scale adds N(0, 1) * scale to an expert's tensors, residual_scale scales its down_proj (mergekit-moe's
    noise comes from torch's global generator; composer's from --seed, so the noise is compared in distribution)."""
    text = moe_recipe(experts["l0"], [experts["l1"], experts["l2"]])
    text = text.replace(f"- source_model: {experts['l2']}\n",
                        f"- source_model: {experts['l2']}\n    noise_scale: 0.01\n    residual_scale: 0.5\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    ours = compose(recipe, tmp_path / "o")
    again = compose(recipe, tmp_path / "o2")
    l1, l2 = load_state_dict(experts["l1"]), load_state_dict(experts["l2"])
    for i in range(4):
        gate_up = ours[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        down = ours[f"model.layers.{i}.mlp.experts.down_proj"]
        assert torch.equal(gate_up, again[f"model.layers.{i}.mlp.experts.gate_up_proj"])  # seeded: reproducible
        g1 = torch.cat([l1[f"model.layers.{i}.mlp.gate_proj.weight"], l1[f"model.layers.{i}.mlp.up_proj.weight"]])
        assert torch.equal(gate_up[0], g1) and torch.equal(down[0], l1[f"model.layers.{i}.mlp.down_proj.weight"])
        g2 = torch.cat([l2[f"model.layers.{i}.mlp.gate_proj.weight"], l2[f"model.layers.{i}.mlp.up_proj.weight"]])
        noise = (gate_up[1] - g2) / 0.01
        assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
        d2 = l2[f"model.layers.{i}.mlp.down_proj.weight"]
        assert abs(((down[1] / 0.5 - d2) / 0.01).std() - 1) < 0.05


@pytest.mark.parametrize(("base", "models", "cls"), [
    ("l0", ["l0", "l0", "l0"], transformers.MixtralForCausalLM),
    ("m0", ["m0", "m0"], transformers.MixtralForCausalLM),
    ("k0", ["k0", "k0"], transformers.Qwen3MoeForCausalLM),
])
@pytest.mark.parametrize("mode", ["cheap_embed", "random", "hidden"])
def test_experts_identical_to_the_base_give_the_base_logits(experts, tmp_path, base, models, cls, mode):
    """The identity oracle: whatever the router picks, top-k weights that sum to one over identical experts give
    the base model's MLP, so the logits are the base's to float32 rounding."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(moe_recipe(experts[base], [experts[m] for m in models], mode))
    compose(recipe, tmp_path / "o", "--seed", "3")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))
    assert type(model) is cls
    ids = DEFAULT_INPUT_IDS[:8]  # within the Mistral fixture's sliding window, which Mixtral drops (as mergekit-moe)
    ours, want = logits(tmp_path / "o", ids), logits(experts[base], ids)
    assert torch.allclose(ours, want, rtol=0, atol=1e-5 * want.abs().max()), (ours - want).abs().max()


def test_qwen_moe_loads_as_its_class(experts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(moe_recipe(experts["q0"], [experts["q0"], experts["q1"]], shared=experts["q1"]))
    compose(recipe, tmp_path / "o")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))
    assert type(model) is transformers.Qwen2MoeForCausalLM
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([DEFAULT_INPUT_IDS])).logits).all()


def test_dry_run_counts_prompt_tokens_without_a_forward_pass(experts, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a dry run must not load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(moe_recipe(experts["l0"], [experts["l1"], experts["l2"]], "hidden"))
    result = CliRunner().invoke(main, [str(recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    gate = next(n for n in notes if n.startswith("routers: hidden"))
    assert "forward passes" in gate and " s here" in gate and "GB of memory" in gate
    assert any("Mixtral" in n and "2 experts" in n for n in notes)


def test_card_and_provenance_name_every_expert(experts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(moe_recipe(experts["l0"], [experts["l1"], experts["l2"]]))
    compose(recipe, tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert "## Experts" in card and "`hello world`" in card and str(experts["l2"]) in card
    prov = json.loads((tmp_path / "o" / "composer_provenance.json").read_text())
    sources = prov["tensors"]["model.layers.2.mlp.experts.gate_up_proj"]["sources"]
    assert [s["model"] for s in sources] == [str(experts["l1"])] * 2 + [str(experts["l2"])] * 2
    assert sources[0]["tensor"] == "model.layers.2.mlp.gate_proj.weight"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["wide"]]), "shapes differ"),
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["l2"]]).replace("experts_per_token: 2", "experts_per_token: 3"),
     "more than the 2 experts"),
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["l2"]], "hidden").replace(
        'positive_prompts: ["she said what"]', "positive_prompts: []"), "has no positive_prompts"),
    (lambda e: moe_recipe(e["q0"], [e["q0"], e["q1"]]), "no MoE output architecture fits"),
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["l2"]], extra="architecture: deepseek\n"), "DeepSeek"),
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["l2"]], extra="architecture: switch\n"), "no MoE output architecture"),
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["l2"]], extra="gate_modes: hidden\n"), "unknown key 'gate_modes'"),
    (lambda e: moe_recipe(e["l0"], [e["l1"], e["l2"]], "hiden"), "gate_mode 'hiden'"),
])
def test_bad_moe_recipes_are_one_line_errors(experts, tmp_path, edit, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(edit(experts))
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_recipes_moe_example_parses(experts, tmp_path):
    """recipes/mixtral-moe.yaml, its models mapped to tiny local ones, plans as a Mixtral."""
    import yaml

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mixtral-moe.yaml"
    doc = yaml.safe_load(recipe.read_text())
    names = [doc["base_model"], *(e["source_model"] for e in doc["experts"])]
    mapping = [f"--model={n}={experts['m0' if k % 2 == 0 else 'm1']}" for k, n in enumerate(dict.fromkeys(names))]
    result = CliRunner().invoke(main, [str(recipe), "--dry-run", "--json", *mapping])
    assert result.exit_code == 0, result.output
    assert any("Mixtral" in n and "4 experts" in n for n in json.loads(result.output)["notes"])


def test_verify_checks_stacked_experts_and_finds_a_changed_one(experts, tmp_path):
    """compose verify re-derives each stacked expert tensor from its sources (routers: finite values) and names an
    expert tensor whose bytes were changed."""
    import struct

    recipe = tmp_path / "r.yaml"
    recipe.write_text(moe_recipe(experts["l0"], [experts["l1"], experts["l2"]]))
    out = tmp_path / "o"
    compose(recipe, out)
    result = CliRunner().invoke(main, ["verify", str(out), "--json", "--skip-logits"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["tensors"]
    assert report["mismatches"] == 0 and report["converted_equal"] == 8 and report["not_rederived"] == 4
    shard = out / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + n])["model.layers.1.mlp.experts.down_proj"]
    at = 8 + n + entry["data_offsets"][0] + 4 * 64 * 128 + 40  # inside the second expert's down_proj
    raw[at] ^= 0x55
    shard.write_bytes(bytes(raw))
    result = CliRunner().invoke(main, ["verify", str(out), "--json", "--skip-logits"])
    assert result.exit_code != 0
    problems = json.loads(result.output)["tensors"]["mismatch_list"]
    assert [p["tensor"] for p in problems] == ["model.layers.1.mlp.experts.down_proj"]


def test_mergekit_moe_flags(experts, tmp_path):
    """mergekit-moe's own flags: the identical-experts switch is accepted and changes nothing; the quantized gate
    loads are refused in one line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(moe_recipe(experts["l0"], [experts["l0"], experts["l0"]]))
    plain = compose(recipe, tmp_path / "a")
    flagged = compose(recipe, tmp_path / "b", "--i-understand-this-is-not-useful-without-training")
    assert plain.keys() == flagged.keys() and all(torch.equal(plain[k], flagged[k]) for k in plain)
    for flag in ("--load-in-4bit", "--load-in-8bit"):
        result = CliRunner().invoke(main, [str(recipe), str(tmp_path / "c"), flag])
        assert result.exit_code == 2 and flag in result.output and "bfloat16" in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
