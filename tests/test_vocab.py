"""Vocabulary alignment (`tokenizer_source`): embedding rows re-indexed by token string, as mergekit does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from composer.cli import main
import test_mergekit
from test_mergekit import run_mergekit

mergekit = test_mergekit.mergekit  # the module-scoped fixture, shared
from tinymodels import load_state_dict, logits, make_checkpoint

SPECIALS = 4  # <s>, </s>, <unk>, <pad> keep their ids (the configs name them)
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _permuted_copy(src: Path, dst: Path, seed: int) -> list[int]:
    """`src` with its token ids shuffled (tokenizer and embedding/head rows alike): the same model, another
    vocabulary order. Returns perm, where new id i holds the token that had id perm[i]."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    n = len(vocab)
    tail = (torch.randperm(n - SPECIALS, generator=torch.Generator().manual_seed(seed)) + SPECIALS).tolist()
    perm = list(range(SPECIALS)) + tail
    new_id = {old: new for new, old in enumerate(perm)}
    doc["model"]["vocab"] = {tok: new_id[i] for tok, i in vocab.items()}
    for added in doc.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    (dst / "tokenizer.json").write_text(json.dumps(doc))
    weights = load_file(dst / "model.safetensors")
    for name in VOCAB:
        if name in weights:
            weights[name] = weights[name][perm].contiguous()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return perm


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    made = {
        "a": make_checkpoint(root / "a", "llama", vocab_size=256, seed=1),
        "short": make_checkpoint(root / "short", "llama", vocab_size=240, seed=2),  # a's first 240 tokens
        "mid": make_checkpoint(root / "mid", "llama", vocab_size=248, seed=3),
    }
    _permuted_copy(made["a"], root / "a-shuffled", seed=4)
    made["a-shuffled"] = root / "a-shuffled"
    return made


def _compose(recipe: Path, out: Path) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return load_state_dict(out)


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_shuffled_vocabulary_aligns_back_to_the_original(vocab_models, tmp_path):
    """Averaging a model with itself under another token order gives the model back, bit for bit: every row is
    matched by token string, whichever order each tokenizer numbers them in."""
    a, shuffled = vocab_models["a"], vocab_models["a-shuffled"]
    assert not torch.equal(load_state_dict(a)["model.embed_tokens.weight"],
                           load_state_dict(shuffled)["model.embed_tokens.weight"])
    text = f"merge_method: linear\nparameters: {{weight: 0.5}}\nmodels: [{{model: {a}}}, {{model: {shuffled}}}]\n"
    for source, expected in (("base", a), (str(shuffled), shuffled)):
        out = _compose(_recipe(tmp_path, text + f"base_model: {a}\ntokenizer_source: {source}\n"), tmp_path / "o")
        want = load_state_dict(expected)
        assert out.keys() == want.keys()
        for name in out:
            assert torch.equal(out[name], want[name]), name
        assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (expected / "tokenizer.json").read_bytes()
        logits(tmp_path / "o")
        shutil.rmtree(tmp_path / "o")


def _expected_rows(tensors: dict[str, torch.Tensor], vocab: dict[str, list[str]], out_tokens: list[str],
                   base: str | None) -> dict[str, torch.Tensor]:
    """mergekit's rule, written plainly: each model's rows in the output order, by token; a model that lacks a
    token gets the row of the only model that has it, else the base's, else the mean of those that have it,
    else zeros."""
    aligned = {m: torch.zeros(len(out_tokens), tensors[m].shape[1]) for m in tensors}
    for r, tok in enumerate(out_tokens):
        have = [m for m in tensors if tok in vocab[m]]
        if len(have) == 1:
            default = tensors[have[0]][vocab[have[0]].index(tok)]
        elif base in have:
            default = tensors[base][vocab[base].index(tok)]
        elif have:
            default = sum(tensors[m][vocab[m].index(tok)] for m in have) / len(have)
        else:
            default = torch.zeros(tensors[base or next(iter(tensors))].shape[1])
        for m in tensors:
            aligned[m][r] = tensors[m][vocab[m].index(tok)] if m in have else default
    return aligned


def _tokens(folder: Path) -> list[str]:
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(vocab, key=vocab.get)


@pytest.mark.parametrize(("base", "source"), [("a", "base"), ("short", "base"), ("a", "mid"), (None, "a")])
def test_missing_tokens_follow_mergekit(vocab_models, tmp_path, base, source):
    """Three vocabularies of 256, 240 and 248 tokens: the output has the tokenizer source's rows; each token a
    model lacks is filled as mergekit fills it (the one model that has it, else the base, else the mean)."""
    names = ["a", "short", "mid"]
    lines = ["merge_method: linear", "models:"] + [f"  - {{model: {vocab_models[m]}, parameters: {{weight: "
                                                  f"{w}}}}}" for m, w in zip(names, (0.5, 0.25, 0.25))]
    if base:
        lines.append(f"base_model: {vocab_models[base]}")
    lines.append(f"tokenizer_source: {source if source == 'base' else vocab_models[source]}")
    out = _compose(_recipe(tmp_path, "\n".join(lines) + "\n"), tmp_path / "o")
    states = {m: load_state_dict(vocab_models[m]) for m in names}
    vocab = {m: _tokens(vocab_models[m]) for m in names}
    out_tokens = vocab[base if source == "base" else source]
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["vocab_size"] == len(out_tokens)
    for name in VOCAB:
        rows = _expected_rows({m: states[m][name] for m in names}, vocab, out_tokens, base)
        expected = 0.5 * rows["a"] + 0.25 * rows["short"] + 0.25 * rows["mid"]
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
    assert logits(tmp_path / "o", list(range(len(out_tokens) - 8, len(out_tokens)))).shape[-1] == len(out_tokens)


def test_different_vocabularies_without_tokenizer_source_are_refused(vocab_models, tmp_path):
    recipe = _recipe(tmp_path, f"merge_method: linear\nparameters: {{weight: 0.5}}\n"
                               f"models: [{{model: {vocab_models['a']}}}, {{model: {vocab_models['short']}}}]\n")
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "vocabulary rows" in result.output and "set tokenizer_source: base" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_aligned_dry_run_says_so(vocab_models, tmp_path):
    recipe = _recipe(tmp_path, f"merge_method: linear\nparameters: {{weight: 0.5}}\ntokenizer_source: base\n"
                               f"base_model: {vocab_models['short']}\n"
                               f"models: [{{model: {vocab_models['a']}}}, {{model: {vocab_models['short']}}}]\n")
    result = CliRunner().invoke(main, [str(recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert any("aligned to the base model" in n and "240 tokens" in n for n in info["notes"])


@pytest.mark.parametrize("case", ["slerp", "ties", "shuffled"])
def test_alignment_matches_mergekit(mergekit, vocab_models, tmp_path, case):
    """The same recipes give mergekit's tensors; float32 recipes, so bit for bit, except slerp, whose angle composer
    takes from float64 sums (see test_mergekit): within F32_ROUNDINGS float32 roundings of the tensor's largest
    value. A row taken from the wrong token would be off by a whole weight, ~10^5 times more."""
    a, short, mid, shuffled = (str(vocab_models[k]) for k in ("a", "short", "mid", "a-shuffled"))
    texts = {
        "slerp": f"merge_method: slerp\nbase_model: {short}\ntokenizer_source: base\ndtype: float32\n"
                 f"parameters: {{t: 0.3}}\nmodels: [{{model: {short}}}, {{model: {a}}}]\n",
        "ties": f"merge_method: ties\nbase_model: {a}\ntokenizer_source: {mid}\ndtype: float32\n"
                f"parameters: {{weight: 0.5, density: 0.5}}\n"
                f"models: [{{model: {a}}}, {{model: {short}}}, {{model: {mid}}}]\n",
        "shuffled": f"merge_method: linear\ntokenizer_source: {shuffled}\ndtype: float32\n"
                    f"parameters: {{weight: 0.5}}\nmodels: [{{model: {a}}}, {{model: {mid}}}]\n",
    }
    recipe = _recipe(tmp_path, texts[case])
    theirs = tmp_path / "theirs"
    run_mergekit(mergekit, [(recipe, theirs)])
    assert not Path(f"{theirs}.err").exists(), Path(f"{theirs}.err").read_text()
    ours = _compose(recipe, tmp_path / "ours")
    mine = load_state_dict(theirs)
    assert ours.keys() == mine.keys()
    for name in ours:
        if case == "slerp":
            bound = test_mergekit.F32_ROUNDINGS * test_mergekit.U_F32 * mine[name].abs().max()
            assert (ours[name] - mine[name]).abs().max() <= bound, name
        else:
            assert torch.equal(ours[name], mine[name]), name
    assert (json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"]
            == json.loads((theirs / "config.json").read_text())["vocab_size"])


def test_a_model_without_tokenizer_files_is_assumed_to_share_the_vocabulary(vocab_models, tmp_path):
    """mergekit assumes a model without tokenizer files has the base's tokenizer; composer does too (its rows were
    counted against the base's), instead of refusing it as a different vocabulary."""
    bare = tmp_path / "bare"
    shutil.copytree(vocab_models["a"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    recipe = _recipe(tmp_path, f"merge_method: linear\nparameters: {{weight: 0.5}}\nbase_model: {vocab_models['a']}\n"
                               f"models: [{{model: {vocab_models['a']}}}, {{model: {bare}}}]\n")
    out = _compose(recipe, tmp_path / "o")
    assert torch.equal(out["model.embed_tokens.weight"], load_state_dict(vocab_models["a"])["model.embed_tokens.weight"])
