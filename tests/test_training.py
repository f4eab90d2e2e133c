"""Training after block expansion: only the new blocks train, found from the provenance composer writes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
import torch
import transformers

import composer
from composer import architectures
from composer.errors import PlanError, SourceError
from composer.cli import main
from composer.training import llama_factory_fit, llama_factory_settings, llama_pro_layers
from test_depth import compose
from tinymodels import DEFAULT_INPUT_IDS, make_checkpoint


def load(path, cls=transformers.AutoModelForCausalLM):
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")


def expanded(models, write_recipe, tmp_path, name="llama", how="every: 2"):
    src = models[name] if name in models else name
    return compose(write_recipe(f"block_expansion: {{model: {src}, {how}}}\n"), tmp_path / "out")


def in_layers(name: str, layers) -> bool:
    m = architectures.LAYER_NAME.match(name)
    return m is not None and m.group("prefix") == "model.layers" and int(m.group("layer")) in layers


def sgd_step(model, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([DEFAULT_INPUT_IDS])
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # qwen2: sharded, q/k/v biases, tied embeddings
def test_one_step_changes_only_the_new_blocks(models, write_recipe, tmp_path, name):
    out = expanded(models, write_recipe, tmp_path, name)
    model = load(out).train()
    result = composer.freeze_original(model, out)
    assert result.new_layers == [2, 5] == composer.new_layers(out)
    names = [n for n, _ in model.named_parameters()]
    assert result.trainable == [n for n in names if in_layers(n, {2, 5})]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(result.trainable)
    assert result.trainable_numel == sum(p.numel() for n, p in model.named_parameters() if n in result.trainable)
    assert result.total_numel == sum(p.numel() for p in model.parameters())
    assert any("embed_tokens" in n for n in names) and not any("embed_tokens" in n for n in result.trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd_step(model)
    after = dict(model.named_parameters())
    provenance = json.loads((out / "composer_provenance.json").read_text())
    zeroed = {f"model.layers.{la['layer']}.{z}" for la in provenance["layers"] if la["status"] == "new"
              for z in la["zeroed"]}
    assert zeroed and zeroed <= set(result.trainable)
    for n, p in after.items():
        if n not in result.trainable:  # frozen: no gradient, bit for bit as loaded
            assert p.grad is None and torch.equal(p, before[n]), n
        elif n in zeroed:  # o_proj / down_proj (and their biases): start at zero, get gradient, move
            assert torch.count_nonzero(before[n]) == 0 and torch.count_nonzero(p.grad) > 0, n
            assert not torch.equal(p, before[n]), n
        else:  # upstream of a zero projection the gradient is exactly zero on step one
            assert torch.count_nonzero(p.grad) == 0 and torch.equal(p, before[n]), n

    sgd_step(model)  # with the projections nonzero, the whole new block trains; the rest stays as loaded
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in result.trainable), n


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_trainable_parameters_are_what_freeze_original_leaves_trainable(models, write_recipe, tmp_path, name):
    out = expanded(models, write_recipe, tmp_path, name)
    model = load(out)
    listed = composer.trainable_parameters(out)
    assert listed == sorted(listed, key=lambda n: (int(n.split(".")[2]), n)) and len(set(listed)) == len(listed)
    assert composer.trainable_parameters(out, model=model) == [n for n, _ in model.named_parameters()
                                                               if in_layers(n, {2, 5})]
    assert all(p.requires_grad for p in model.parameters())  # model= only reads
    trained = composer.freeze_original(model, out).trainable
    assert set(listed) == set(trained) and len(listed) == len(trained)
    assert composer.trainable_parameters(out, model=model) == trained


def test_base_model_and_wrapped_names_map_too(models, write_recipe, tmp_path):
    """AutoModel's parameters are `layers.N...` (no `model.`): the layer rule maps them by trailing components."""
    out = expanded(models, write_recipe, tmp_path)
    base = load(out, transformers.AutoModel)
    trained = composer.freeze_original(base, out).trainable
    assert trained and all(n.startswith(("layers.2.", "layers.5.")) for n in trained)
    assert {n for n, p in base.named_parameters() if p.requires_grad} == set(trained)
    wrapper = torch.nn.Module()
    wrapper.config, wrapper.inner = base.config, load(out)
    assert all(n.startswith(("inner.model.layers.2.", "inner.model.layers.5."))
               for n in composer.freeze_original(wrapper, out).trainable)


def llama_factory_rule(num_layers: int, freeze_trainable_layers: int) -> list[int]:
    """LLaMA-Factory's use_llama_pro selection, as written in src/llamafactory/model/adapter.py
    (_setup_freeze_tuning): it reads no metadata, only the config's layer count."""
    assert num_layers % freeze_trainable_layers == 0  # LLaMA-Factory raises ValueError otherwise
    stride = num_layers // freeze_trainable_layers
    return list(range(stride - 1, num_layers + stride - 1, stride))


@pytest.mark.parametrize(("depth", "how", "new"), [
    (4, "every: 2", [2, 5]),  # LLaMA Pro's placement, 4 -> 6
    (8, "num_layers: 10", [4, 9]),  # 8 -> 10
    (4, "every: 1", [1, 3, 5, 7]),  # 4 -> 8
    (4, "num_layers: 5", [4]),
])
def test_llama_factory_use_llama_pro_trains_exactly_the_new_blocks(write_recipe, tmp_path, depth, how, new):
    """The LLaMA-Factory settings for a composer expansion: `finetuning_type: freeze`, `use_llama_pro: true`,
    `freeze_trainable_layers: <number of new blocks>` (the count, not the indices)."""
    src = make_checkpoint(tmp_path / "src", "llama", num_layers=depth)
    out = compose(write_recipe(f"block_expansion: {{model: {src}, {how}}}\n"), tmp_path / "out")
    total = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert composer.new_layers(out) == new
    assert llama_factory_rule(total, len(new)) == new == llama_pro_layers(total, len(new))
    assert llama_factory_settings(out) == {"finetuning_type": "freeze", "use_llama_pro": True,
                                           "freeze_trainable_layers": len(new)}
    # The dry run and the card say so, with the settings.
    recipe = tmp_path / "recipe.yaml"
    plan = json.loads(CliRunner().invoke(main, [str(recipe), "--dry-run", "--json"]).stdout)
    assert plan["training"]["llama_factory"] == llama_factory_settings(out) and plan["training"]["new_layers"] == new
    text = CliRunner().invoke(main, [str(recipe), "--dry-run"]).stdout
    assert f"freeze_trainable_layers: {len(new)} selects exactly them" in text and "WARNING" not in text
    card = (out / "README.md").read_text()
    assert f"use_llama_pro: true\nfreeze_trainable_layers: {len(new)}\n" in card and "Do not use" not in card


def test_llama_factory_mismatch_is_refused(write_recipe, tmp_path):
    """`every: 3` on 4 layers inserts one block after layer 2 (new layer 3 of 5); use_llama_pro would train 4."""
    src = make_checkpoint(tmp_path / "src", "llama", num_layers=4)
    out = compose(write_recipe(f"block_expansion: {{model: {src}, every: 3}}\n"), tmp_path / "out")
    assert composer.new_layers(out) == [3] and llama_factory_rule(5, 1) == [4]
    with pytest.raises(PlanError, match=r"would train layers \[4\].*freeze_original"):
        llama_factory_settings(out)
    # The dry run, the run itself and the card warn, and point to composer's freeze helper.
    recipe = tmp_path / "recipe.yaml"
    plan = json.loads(CliRunner().invoke(main, [str(recipe), "--dry-run", "--json"]).stdout)
    assert plan["training"]["llama_factory"] is None and "would train layers [4]" in \
        plan["training"]["llama_factory_mismatch"]
    text = CliRunner().invoke(main, [str(recipe), "--dry-run"]).stdout
    assert "WARNING" in text and "composer.freeze_original" in text
    run = CliRunner().invoke(main, [str(recipe), str(tmp_path / "again")])
    assert run.exit_code == 0 and "warning:" in run.stderr and "composer.freeze_original" in run.stderr
    assert "warning:" not in CliRunner().invoke(main, [str(recipe), str(tmp_path / "quiet"), "-q"]).stderr
    card = (out / "README.md").read_text()
    assert "Do not use LLaMA-Factory's `use_llama_pro`" in card and "composer.freeze_original" in card


def test_llama_factory_catches_numbered_experts():
    """LLaMA-Factory selects parameters whose names contain `.{i}.`: in Mixtral-style checkpoints `experts.1.` of
    every layer too, so an expansion whose new layers match its rule still trains more than the new blocks."""
    names = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight" for layer in range(4) for e in range(2)]
    assert llama_factory_fit([1, 3], 4)[0] == {"finetuning_type": "freeze", "use_llama_pro": True,
                                               "freeze_trainable_layers": 2}
    settings, why = llama_factory_fit([1, 3], 4, names)
    assert settings is None and "experts [1]" in why
    assert llama_factory_fit([2, 5], 6, names)[0] is not None  # no expert is numbered 2 or 5


def test_refusals(models, write_recipe, tmp_path):
    out = expanded(models, write_recipe, tmp_path)
    source = load(models["llama"])
    with pytest.raises(SourceError, match="composer_provenance.json"):
        composer.freeze_original(source, models["llama"])  # a plain checkpoint: no provenance
    with pytest.raises(SourceError, match="composer_provenance.json"):
        composer.trainable_parameters(tmp_path / "nowhere")
    with pytest.raises(PlanError, match="has 4 layers.*lists 6"):
        composer.freeze_original(source, out)  # the source, not the expanded model
    assert all(p.requires_grad for p in source.parameters())  # nothing changed by a refusal

    src = models["llama"]
    dus = compose(write_recipe(f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 3]}}]\n"
                               f"  - sources: [{{model: {src}, layer_range: [1, 4]}}]\nmerge_method: passthrough\n",
                               "dus.yaml"), tmp_path / "dus")
    for call in (lambda: composer.freeze_original(load(dus), dus), lambda: composer.trainable_parameters(dus),
                 lambda: composer.new_layers(dus)):
        with pytest.raises(PlanError, match="no layer is new.*not a block expansion"):
            call()
