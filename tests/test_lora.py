"""LoRA sources (`model+adapter`): adapters made with the real peft library, merged while streaming, against peft's
own merge_and_unload and against mergekit 0.1.5."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import test_mergekit
from composer.cli import main
from composer.lora import split_reference
from composer.recipe import parse_recipe
from test_mergekit import run_mergekit
from tinymodels import load_state_dict, logits, make_checkpoint

peft = pytest.importorskip("peft")  # the test extra
mergekit = test_mergekit.mergekit

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def make_adapter(model: Path, out: Path, *, seed: int, targets=TARGETS, save=("lm_head",), **extra) -> Path:
    """A LoRA adapter for `model`, trained by nobody: B matrices drawn at random so that the delta is not zero."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=list(save) or None,
                             **extra)
    wrapped = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_()
    wrapped.save_pretrained(str(out))
    return out


def peft_merged(model: Path, adapter: Path) -> dict[str, torch.Tensor]:
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model))
    return {k: v.detach() for k, v in
            peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    made = {"a": make_checkpoint(root / "a", "llama", seed=21), "b": make_checkpoint(root / "b", "llama", seed=22),
            "a16": make_checkpoint(root / "a16", "llama", seed=23, dtype=torch.bfloat16)}
    made["ad"] = make_adapter(made["a"], root / "ad", seed=1, rank_pattern={"down_proj": 2},
                              alpha_pattern={"v_proj": 3})
    made["rs"] = make_adapter(made["a"], root / "rs", seed=2, targets=["o_proj", "gate_proj"], save=(),
                              use_rslora=True)
    made["ad16"] = make_adapter(made["a16"], root / "ad16", seed=3, targets=["q_proj", "up_proj"], save=())
    return made


def _run(tmp_path: Path, text: str, *args: str):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return CliRunner().invoke(main, [str(recipe), *args])


def _one(model: str) -> str:
    return f"merge_method: passthrough\nmodels: [{{model: '{model}'}}]\n"


@pytest.mark.parametrize(("model", "adapter"), [("a", "ad"), ("a", "rs"), ("a16", "ad16")])
def test_passthrough_equals_peft_merge_and_unload(lora, tmp_path, model, adapter):
    """model+adapter gives peft's merge_and_unload, bit for bit: the delta (B @ A) * scaling in float32 (rank_pattern,
    alpha_pattern and rslora scaling as peft reads them), added in float32, rounded once to the weight's dtype;
    modules_to_save and the saved embedding replace the model's."""
    out = tmp_path / "o"
    result = _run(tmp_path, _one(f"{lora[model]}+{lora[adapter]}"), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    ours, want = load_state_dict(out), peft_merged(lora[model], lora[adapter])
    original = load_state_dict(lora[model])
    assert ours.keys() == want.keys()
    changed = [k for k in ours if not torch.equal(original[k], want[k])]
    assert len(changed) >= 8
    for name in ours:
        assert ours[name].dtype == want[name].dtype and torch.equal(ours[name], want[name]), name
    theirs = tmp_path / "peft"  # peft's merged weights in the model's folder layout: the same logits
    shutil.copytree(lora[model], theirs)
    save_file({k: v.contiguous() for k, v in want.items()}, theirs / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(logits(out), logits(theirs))


def test_the_plan_shows_what_an_adapter_changes(lora, tmp_path):
    result = _run(tmp_path, _one(f"{lora['a']}+{lora['ad']}"), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    note = next(n for n in notes if "adapter changes" in n)
    assert "self_attn.q_proj" in note and "mlp.down_proj" in note and "lm_head.weight" in note and "4 layers" in note


def test_a_merge_with_an_adapted_model_matches_mergekit(mergekit, lora, tmp_path):
    """linear and ties of A+adapter with B: mergekit merges the adapter with peft first, then merges; float32, so
    bit for bit (mergekit -> peft -> the same float32 arithmetic)."""
    jobs = []
    for method, params in (("linear", "{weight: 0.5}"), ("ties", "{weight: 0.5, density: 0.5}")):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(f"merge_method: {method}\nbase_model: {lora['b']}\ndtype: float32\nparameters: {params}\n"
                          f"models:\n  - model: {lora['a']}+{lora['ad']}\n  - model: {lora['b']}\n")
        jobs.append((recipe, tmp_path / f"theirs-{method}"))
    run_mergekit(mergekit, jobs, ("--lora-merge-cache", str(tmp_path / "lora-cache")))
    for recipe, theirs in jobs:
        assert not Path(f"{theirs}.err").exists(), Path(f"{theirs}.err").read_text()[-2000:]
        out = tmp_path / f"ours-{recipe.stem}"
        result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        ours, ref = load_state_dict(out), load_state_dict(theirs)
        assert ours.keys() == ref.keys()
        for name in ours:
            assert torch.equal(ours[name], ref[name]), (recipe.stem, name)


def test_references_parse_as_mergekits():
    assert split_reference("org/model@v1+org/adapter@abc") == ("org/model@v1", "org/adapter@abc")
    assert split_reference("org/model") == ("org/model", None)
    recipe = parse_recipe("merge_method: passthrough\nmodels: [{model: org/m@main+org/lora@r2}]\n")
    assert recipe.referenced_models() == ["org/m@main+org/lora@r2"]


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _bad_adapters(lora, root: Path) -> dict[str, tuple[Path, Path, str]]:
    """case -> (model, adapter, what the error says)"""
    bad = {}
    bad["dora"] = (lora["a"], _edit_config(lora["ad"], root / "dora", use_dora=True), "DoRA (use_dora)")
    bad["rank"] = (lora["a"], _edit_config(lora["rs"], root / "rank", r=8), "rank 4 in the file but 8")
    none = root / "none"
    shutil.copytree(lora["ad"], none)
    (none / "adapter_config.json").unlink()
    bad["no-config"] = (lora["a"], none, "has no adapter_config.json")
    deep = make_checkpoint(root / "deep", "llama", seed=24, num_layers=6)
    bad["missing-module"] = (lora["a"], make_adapter(deep, root / "deep-ad", seed=4, targets=["q_proj"], save=()),
                             "targets 'model.layers.4.self_attn.q_proj', which")
    wide = make_checkpoint(root / "wide", "llama", seed=25, intermediate_size=96)
    bad["shapes"] = (lora["a"], make_adapter(wide, root / "wide-ad", seed=5, targets=["down_proj"], save=()),
                     "the adapter was trained for another model")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(lora["rs"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Path("/etc/passwd")))
    bad["pickle"] = (lora["a"], pickled, "does not load with weights_only=True")
    return bad


def test_pickled_adapter_that_loads_weights_only_is_accepted(lora, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(lora["rs"] / "adapter_config.json", folder)
    torch.save(load_file(lora["rs"] / "adapter_model.safetensors"), folder / "adapter_model.bin")
    out = tmp_path / "o"
    assert _run(tmp_path, _one(f"{lora['a']}+{folder}"), "-o", str(out), "-q").exit_code == 0
    want = peft_merged(lora["a"], lora["rs"])
    for name, t in load_state_dict(out).items():
        assert torch.equal(t, want[name]), name


@pytest.mark.parametrize("case", ["dora", "rank", "no-config", "missing-module", "shapes", "pickle"])
def test_bad_adapters_are_refused_by_name(lora, tmp_path_factory, tmp_path, case):
    root = tmp_path_factory.getbasetemp() / "bad-adapters"
    if not root.exists():
        root.mkdir()
        test_bad_adapters_are_refused_by_name.made = _bad_adapters(lora, root)
    model, adapter, message = test_bad_adapters_are_refused_by_name.made[case]
    before = {p: p.read_bytes() for p in adapter.iterdir()}
    result = _run(tmp_path, _one(f"{model}+{adapter}"), "-o", str(tmp_path / "o"))
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert {p: p.read_bytes() for p in adapter.iterdir()} == before


@pytest.mark.parametrize("name", ["a+b+c", "+a", "a+", "a@1@2+b"])
def test_malformed_references_are_refused(tmp_path, name):
    result = _run(tmp_path, _one(name), "--dry-run")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "ADAPTER" in result.output or "@revision" in result.output, result.output


def test_fan_in_fan_out_layers_take_the_transpose(tmp_path):
    """GPT-2 keeps its projections as Conv1D (in, out) weights: peft's adapter says fan_in_fan_out and its delta is
    (B @ A).T; composer's merge equals peft's bit for bit."""
    from tinymodels import save_random

    model = save_random(tmp_path / "gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)), seed=31)
    adapter = make_adapter(model, tmp_path / "ad", seed=6, targets=["c_attn", "c_fc"], save=(), fan_in_fan_out=True)
    out = tmp_path / "o"
    result = _run(tmp_path, _one(f"{model}+{adapter}"), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    want = peft_merged(model, adapter)
    ours = load_state_dict(out)
    changed = 0
    for name, t in ours.items():
        changed += not torch.equal(t, load_state_dict(model)[name])
        assert torch.equal(t, want[name]), name
    assert changed == 4


def test_verify_re_derives_adapted_tensors(lora, tmp_path):
    """compose verify recomputes each LoRA-merged tensor from the model and its adapter, bit for bit."""
    out = tmp_path / "o"
    assert _run(tmp_path, _one(f"{lora['a']}+{lora['ad']}"), "-o", str(out), "-q").exit_code == 0
    result = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tensors"]["mismatches"] == 0 and report["tensors"]["converted_equal"] >= 8
