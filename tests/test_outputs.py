"""The output folder is complete: config, generation config, tokenizer, card, recipe, provenance; it loads as is."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer.cli import main
from tinymodels import load_state_dict, logits, make_checkpoint

REPO = Path(__file__).resolve().parent.parent


def compose(recipe: Path, out: Path) -> Path:
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_qwen2_upscale_rewrites_layer_types_and_loads(models, write_recipe, tmp_path):
    src = models["qwen2"]
    out = compose(write_recipe(f"""
merge_method: passthrough
dtype: bfloat16
slices:
  - sources: [{{model: {src}, layer_range: [0, 3]}}]
  - sources: [{{model: {src}, layer_range: [1, 4]}}]
"""), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["dtype"] == "bfloat16"
    assert config["layer_types"] == [source["layer_types"][i] for i in (0, 1, 2, 1, 2, 3)]
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in load_state_dict(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.dtype == torch.bfloat16


def test_metadata_files(models, write_recipe, tmp_path):
    a, b = models["llama"], models["llama-b"]
    text = f"interleave: {{models: [{a}, {b}], window: 2, overlap: 1}}\n"
    out = compose(write_recipe(text), tmp_path / "out")
    assert (out / "composer_recipe.yaml").read_text() == text
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (a / "generation_config.json").read_text())

    tok_out, tok_src = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(a)
    assert tok_out("hello world the end")["input_ids"] == tok_src("hello world the end")["input_ids"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"tags": ["composer", "merge", "interleave"], "library_name": "transformers"}  # no local paths
    assert "arxiv.org/abs/2312.15166" in card and text.strip() in card
    assert f"{sum(v.numel() for v in load_state_dict(out).values()):,} parameters" in card
    assert f"| 2-3 | {b} | 1-2 | copied |" in card

    prov = json.loads((out / "composer_provenance.json").read_text())
    sd = load_state_dict(out)
    assert sorted(prov["tensors"]) == sorted(sd)
    entry = prov["tensors"]["model.layers.3.mlp.up_proj.weight"]
    assert entry["sources"] == [{"model": str(b), "tensor": "model.layers.2.mlp.up_proj.weight"}]
    assert entry["status"] == "copied" and entry["layer"] == 3 and entry["source_layer"] == 2
    assert [la["model"] for la in prov["layers"]] == [str(a)] * 2 + [str(b)] * 2 + [str(a)] * 2
    assert prov["new_layers"] == []


def test_block_expansion_card_and_provenance(models, write_recipe, tmp_path):
    src = models["llama"]
    out = compose(write_recipe(f"block_expansion: {{model: {src}, num_layers: 6}}\n"), tmp_path / "out")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front and "block-expansion" in front["tags"]  # local folders are not Hub lineage
    assert "arxiv.org/abs/2401.02415" in card
    prov = json.loads((out / "composer_provenance.json").read_text())
    zeroed = sorted(n for n, e in prov["tensors"].items() if e["status"] == "zeroed")
    assert zeroed == sorted(f"model.layers.{i}.{p}" for i in (2, 5)
                            for p in ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
    trainable = {n for n, e in prov["tensors"].items() if e.get("layer") in prov["new_layers"]}
    assert len(trainable) == 2 * 9


def test_tokenizer_source(models, write_recipe, tmp_path):
    a = models["llama"]
    same_vocab = models["llama-b"]
    out = compose(write_recipe(f"block_expansion: {{model: {a}, every: 2}}\ntokenizer_source: {same_vocab}\n"),
                  tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (same_vocab / "tokenizer.json").read_bytes()
    # a larger vocabulary (the 256 tokens first, then 44 more): rows aligned by token, unknown tokens zero
    other = make_checkpoint(tmp_path / "other", "llama", vocab_size=300)
    out2 = compose(write_recipe(f"block_expansion: {{model: {a}, every: 2}}\ntokenizer_source: {other}\n",
                                "r2.yaml"), tmp_path / "out2")
    assert json.loads((out2 / "config.json").read_text())["vocab_size"] == 300
    got, original = load_state_dict(out2), load_state_dict(a)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][:256], original[name]) and not got[name][256:].any()
    # without tokenizer_source, a model whose vocabulary differs from the base's cannot give the embeddings
    result = CliRunner().invoke(main, [str(write_recipe(
        f"merge_method: passthrough\nbase_model: {a}\nslices:\n  - sources: [{{model: {other}, layer_range: [0, 2]}}]\n"
        f"  - sources: [{{model: {a}, layer_range: [2, 4]}}]\n", "r3.yaml")), "-o", str(tmp_path / "out3")])
    assert result.exit_code == 1 and "set tokenizer_source" in result.output, result.output


def test_quick_start_example_runs_offline(tmp_path):
    """The README's quick start: the installed `compose` command on the shipped tiny model."""
    compose_bin = Path(sys.executable).with_name("compose")
    proc = subprocess.run([str(compose_bin), "recipes/tiny-llama-pro.yaml", "-o", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 10
    assert torch.equal(logits(REPO / "examples" / "tiny-llama"), logits(tmp_path / "out"))


def test_compose_command_flushes_and_exits_with_clicks_code(tmp_path):
    """`compose` ends with os._exit once torch is loaded: what it printed must still arrive, and the exit code
    must still be click's (0, 1 for a composer error, 2 for a usage error)."""
    compose_bin = Path(sys.executable).with_name("compose")
    out = tmp_path / "out"
    proc = subprocess.run([str(compose_bin), "recipes/tiny-llama-pro.yaml", "-o", str(out), "--json", "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == str(out)
    again = subprocess.run([str(compose_bin), "recipes/tiny-llama-pro.yaml", "-o", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"Error: destination {out} is not empty: pass --overwrite to replace it"]
    usage = subprocess.run([str(compose_bin), "recipes/tiny-llama-pro.yaml"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert usage.returncode == 2 and "give an output folder" in usage.stderr
    # the same refusal with torch already loaded, as after an earlier stage: the os._exit path
    loaded = subprocess.run([sys.executable, "-c", "import sys, torch; from composer.cli import run; "
                             f"sys.argv = ['compose', 'recipes/tiny-llama-pro.yaml', '-o', {str(out)!r}]; run()"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (loaded.returncode, loaded.stderr) == (again.returncode, again.stderr)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    from composer import load_recipe

    load_recipe(REPO / "recipes" / recipe)


def test_readme_method_examples_are_valid_recipes():
    """Every method has an example in the README, and each example is a recipe composer accepts."""
    import re

    from composer.methods import METHODS
    from composer.recipe import parse_recipes

    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("# ") and "merge_method:" in b]
    shown = set()
    for block in blocks:
        (recipe, _), = parse_recipes(block, "README.md")
        shown.add(recipe.merge_method)
        first = block.split("\n", 1)[0]
        shown.update(m for m in METHODS if re.search(rf"\b{m}\b", first))
    assert set(METHODS) <= shown, sorted(set(METHODS) - shown)


def test_registry_drives_the_schema_the_card_and_the_readme_table(models, write_recipe):
    """Every registered method is accepted by the recipe schema, named with its paper in the card, and listed in
    the README's method table, which is exactly the one the registry renders."""
    from composer.card import model_card
    from composer.methods import METHODS, REGISTRY, table
    from composer.recipe import MERGE_METHODS, parse_recipe

    text = (REPO / "README.md").read_text()
    assert table() in text
    assert set(MERGE_METHODS) == set(METHODS) and len(REGISTRY) == len(METHODS)
    for m in REGISTRY:
        assert f"| `{m.name}` |" in text and m.url in text, m.name
        required = {p.name: 0.5 for p in m.params if p.required and not p.per_input}
        per = {p.name: 0.5 for p in m.params if p.required and p.per_input}
        recipe = parse_recipe(f"merge_method: {m.name}\nbase_model: B\nparameters: {required or {}}\n"
                              f"models: [{{model: B}}, {{model: C, parameters: {per or {}}}}]\n")
        assert recipe.merge_method == m.name
    a, b = models["llama"], models["llama-b"]
    from composer import plan_recipe

    plan = plan_recipe(write_recipe(f"merge_method: nearswap\nbase_model: {a}\nparameters: {{t: 0.01}}\n"
                                    f"models: [{{model: {a}}}, {{model: {b}}}]\n"))
    card = model_card(plan)
    assert METHODS["nearswap"].summary in card and METHODS["nearswap"].url in card
