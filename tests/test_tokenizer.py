"""The output tokenizer: `tokenizer_source: union`, the `tokenizer:` block (`tokens`, `pad_to_multiple_of`) and
`chat_template`, on tiny models whose vocabularies really differ, against mergekit 0.1.5 and against the rule
written plainly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import test_mergekit
from composer.cli import main
from composer.templates import BUILTIN
from test_mergekit import run_mergekit
from test_vocab import _permuted_copy
from tinymodels import load_state_dict, logits, make_checkpoint

mergekit = test_mergekit.mergekit  # the module-scoped fixture, shared
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
PROBE = "<|im_start|>user\nhello world<|im_end|>"
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _add_tokens(folder: Path, tokens, special: bool, seed: int, template: str | None = None) -> None:
    """Give `folder`'s tokenizer `tokens` (added tokens, as a chat fine-tune adds them) and its embedding and head
    one new random row each, as resize_token_embeddings would."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.add_tokens([transformers.AddedToken(t, special=special, normalized=False) for t in tokens])
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(folder))
    weights = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB:
        w = weights[name]
        weights[name] = torch.cat([w, torch.randn((len(tokens), w.shape[1]), generator=g, dtype=w.dtype)])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += len(tokens)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory) -> dict[str, Path]:
    """a: the base vocabulary (256 tokens); chat: another model with two added chat tokens and a chat template;
    shuffled: another model whose 256 tokens are numbered in another order; short: a model with 16 tokens fewer."""
    root = tmp_path_factory.mktemp("tok")
    made = {"a": make_checkpoint(root / "a", "llama", vocab_size=256, seed=11),
            "chat": make_checkpoint(root / "chat", "llama", vocab_size=256, seed=12),
            "short": make_checkpoint(root / "short", "llama", vocab_size=240, seed=13)}
    _add_tokens(made["chat"], CHAT_TOKENS, special=True, seed=5, template=TEMPLATE)
    make_checkpoint(root / "b", "llama", vocab_size=256, seed=14)
    _permuted_copy(root / "b", root / "shuffled", seed=6)
    made["shuffled"] = root / "shuffled"
    return made


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _compose(recipe: Path, out: Path):
    result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return load_state_dict(out)


def _tokens(folder: Path) -> dict[str, int]:
    return dict(transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab())


def _merge(method: str, vocabs, names, extra: str = "", base: str = "a", dtype: str = "float32") -> str:
    params = {"linear": "{weight: 0.5}", "slerp": "{t: 0.3}", "ties": "{weight: 0.5, density: 0.6}"}[method]
    models = [n for n in names if not (method == "slerp" and n == base)]
    lines = [f"merge_method: {method}", f"base_model: {vocabs[base]}", f"dtype: {dtype}", f"parameters: {params}",
             "models:", *(f"  - model: {vocabs[n]}" for n in ([base] if method == "slerp" else []) + models)]
    return "\n".join(lines) + "\n" + extra


UNION = "tokenizer_source: union\n"
TOKENS_BLOCK = """\
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "<|im_start|>": {source: {kind: model_token, model: @a, token: "<s>"}}
    "<|im_end|>": {source: {kind: zero}}
    "hello": {source: @chat, force: true}
    "<|tool|>": {source: {kind: model_token, model: @chat, token_id: 5}}
"""


def _with_paths(text: str, vocabs) -> str:
    return text.replace("@chat", str(vocabs["chat"])).replace("@a", str(vocabs["a"]))


CROSS = {  # case -> (method, models, recipe tail)
    "union-linear": ("linear", ("a", "chat", "shuffled", "short"), UNION),
    "union-slerp": ("slerp", ("a", "chat"), UNION),
    "union-ties": ("ties", ("a", "chat", "shuffled"), UNION),
    "base-linear-chat": ("linear", ("a", "chat"), "tokenizer_source: base\n"),
    "model-ties-chat": ("ties", ("a", "chat", "short"), "tokenizer_source: @chat\n"),
    "tokens-pad-linear": ("linear", ("a", "chat", "short"), TOKENS_BLOCK),
    "union-chatml": ("linear", ("a", "chat"), UNION + "chat_template: chatml\n"),
}


@pytest.fixture(scope="module")
def theirs(mergekit, vocabs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every cross-check case's recipe and mergekit's output for it, from one mergekit process."""
    root = tmp_path_factory.mktemp("tok-mergekit")
    jobs = {}
    for case, (method, names, tail) in CROSS.items():
        recipe = _recipe(root, _merge(method, vocabs, names, _with_paths(tail, vocabs)), f"{case}.yml")
        jobs[case] = (recipe, root / case)
    run_mergekit(mergekit, list(jobs.values()))
    for case, (_, out) in jobs.items():
        assert not Path(f"{out}.err").exists(), (case, Path(f"{out}.err").read_text()[-2000:])
    return jobs


def test_union_holds_every_models_tokens_in_mergekits_order(vocabs, tmp_path):
    """The base's 256 tokens keep their ids, the chat model's two added tokens follow; the reordered and the
    shorter vocabulary add nothing; the output tokenizer loads and encodes the chat markers as single tokens."""
    text = _merge("linear", vocabs, ("a", "chat", "shuffled", "short"), UNION)
    out = tmp_path / "o"
    _compose(_recipe(tmp_path, text), out)
    vocab = _tokens(out)
    base = _tokens(vocabs["a"])
    assert len(vocab) == 258 and all(vocab[t] == i for t, i in base.items())
    assert [vocab[t] for t in CHAT_TOKENS] == [256, 257]
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    assert ids[0] == 256 and ids[-1] == 257
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 258
    assert logits(out, [256, 257, 5]).shape[-1] == 258
    card = (out / "README.md").read_text()
    assert "## Tokenizer" in card and "union of 4 models" in card


def test_union_rows_follow_the_rule_written_plainly(vocabs, tmp_path):
    """Each model's rows by token; a token a model lacks takes the one model's row that has it, else the base's,
    else the mean of those that have it (mergekit's PermutedVocabulary)."""
    names = ("a", "chat", "shuffled", "short")
    out = _compose(_recipe(tmp_path, _merge("linear", vocabs, names, UNION)), tmp_path / "o")
    order = sorted(_tokens(tmp_path / "o"), key=_tokens(tmp_path / "o").get)
    vocab = {n: _tokens(vocabs[n]) for n in names}
    states = {n: load_state_dict(vocabs[n]) for n in names}
    for name in VOCAB:
        rows = {n: torch.zeros(len(order), states[n][name].shape[1]) for n in names}
        for r, tok in enumerate(order):
            have = [n for n in names if tok in vocab[n]]
            if len(have) == 1:
                default = states[have[0]][name][vocab[have[0]][tok]]
            elif "a" in have:
                default = states["a"][name][vocab["a"][tok]]
            else:
                default = sum(states[n][name][vocab[n][tok]] for n in have) / len(have)
            for n in names:
                rows[n][r] = states[n][name][vocab[n][tok]] if tok in vocab[n] else default
        expected = sum(0.5 * rows[n] for n in names) / (0.5 * len(names))  # linear normalizes its weights
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CROSS)
def test_vocabularies_match_mergekit(theirs, vocabs, tmp_path, case):
    """Union, base and model vocabularies, `tokens` overrides and padding: mergekit's tensors (float32, so bit for
    bit; slerp within the bound test_mergekit derives; padding rows, a mean composer sums in float64, within a
    few float32 roundings), its vocab_size, and its tokenizer's encoding of a probe that uses the added tokens."""
    recipe, mine = theirs[case]
    out = tmp_path / "ours"
    ours = _compose(recipe, out)
    ref = load_state_dict(mine)
    assert ours.keys() == ref.keys()
    config, their_config = (json.loads((d / "config.json").read_text()) for d in (out, mine))
    assert config["vocab_size"] == their_config["vocab_size"]
    real = len(_tokens(out))
    for name in ours:
        a, b = ours[name], ref[name]
        if case == "union-slerp":
            bound = test_mergekit.F32_ROUNDINGS * test_mergekit.U_F32 * b.abs().max()
            assert (a - b).abs().max() <= bound, name
        elif name in VOCAB and a.shape[0] > real:
            assert torch.equal(a[:real], b[:real]), name
            assert (a[real:] - b[real:]).abs().max() <= 8 * test_mergekit.U_F32 * b[real:].abs().max(), name
        else:
            assert torch.equal(a, b), name
    tok, their_tok = (transformers.AutoTokenizer.from_pretrained(str(d)) for d in (out, mine))
    assert tok.get_vocab() == their_tok.get_vocab()
    probe = PROBE + " <|tool|> hello"
    assert tok(probe)["input_ids"] == their_tok(probe)["input_ids"]
    assert (tok.chat_template is None) == (their_tok.chat_template is None)
    if tok.chat_template:  # composer's built-in template text is its own: the same rendering is what counts
        for conversation in CONVERSATIONS:
            assert (tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
                    == their_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))


def test_new_plain_tokens_are_added_in_the_recipes_order(vocabs, tmp_path, mergekit):
    """Base 'short' lacks 16 of 'a''s plain tokens: the union adds them after the base's, in 'a''s id order (mergekit
    adds them in a hash order, different from run to run: there the rows agree token by token)."""
    recipe = _recipe(tmp_path, _merge("linear", vocabs, ("short", "a"), UNION, base="short"))
    ours = _compose(recipe, tmp_path / "ours")
    vocab = _tokens(tmp_path / "ours")
    a = _tokens(vocabs["a"])
    new = sorted((t for t in a if t not in _tokens(vocabs["short"])), key=a.get)
    assert [vocab[t] for t in new] == list(range(240, 256))
    run_mergekit(mergekit, [(recipe, tmp_path / "theirs")])
    theirs, their_vocab = load_state_dict(tmp_path / "theirs"), _tokens(tmp_path / "theirs")
    assert their_vocab.keys() == vocab.keys()
    for name in VOCAB:
        for t, i in vocab.items():
            assert torch.equal(ours[name][i], theirs[name][their_vocab[t]]), (name, t)


def test_chat_template_auto_builtin_and_literal(vocabs, tmp_path):
    """auto picks the template the inputs share (only 'chat' has one); a built-in name and a literal template end
    in the output as they are; apply_chat_template works on each output tokenizer; the card says which."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    literal = "{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>{% endfor %}"
    for value, want, says in (("auto", TEMPLATE, "auto"), ("chatml", BUILTIN["chatml"], "built-in 'chatml'"),
                              (json.dumps(literal), literal, "the recipe's own")):
        out = tmp_path / "o"
        _compose(_recipe(tmp_path, _merge("linear", vocabs, ("a", "chat"), UNION + f"chat_template: {value}\n")), out)
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert tok.chat_template.strip() == want.strip()
        text = tok.apply_chat_template(messages, tokenize=False)
        assert "hi" in text and "yo" in text
        assert says in (out / "README.md").read_text()
        shutil.rmtree(out)
    # a template without any vocabulary change: the base's tokenizer, re-saved with it
    plain = f"merge_method: linear\nparameters: {{weight: 0.5}}\nchat_template: chatml\nmodels: [{{model: {vocabs['a']}}}]\n"
    _compose(_recipe(tmp_path, plain), tmp_path / "p")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "p"))
    assert tok.apply_chat_template(messages, tokenize=False).startswith("<|im_start|>user\nhi<|im_end|>")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": " What is 2+2? "},
     {"role": "assistant", "content": "4 "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}, {"role": "user_context", "content": "ctx"}, {"role": "assistant", "content": "r"}],
]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_render_as_mergekits(mergekit, vocabs, name):
    """composer's built-in templates render exactly what mergekit 0.1.5's of the same name render."""
    theirs = next(Path(mergekit).resolve().parents[1].glob(f"lib/python*/site-packages/mergekit/_data/chat_templates/"
                                                         f"{name}.jinja")).read_text()
    tok = transformers.AutoTokenizer.from_pretrained(str(vocabs["a"]))

    def render(template, conversation, prompt):
        try:
            return tok.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                           add_generation_prompt=prompt)
        except Exception as exc:  # noqa: BLE001 - both must refuse the same conversations
            return f"error: {exc}"

    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            assert render(BUILTIN[name], conversation, prompt) == render(theirs, conversation, prompt)


@pytest.mark.parametrize(("tail", "message"), [
    ("tokenizer_source: union\ntokenizer: {source: base}\n", "not both"),
    ("chat_template: chatlm\n", "did you mean 'chatml'"),
    ("chat_template: '{x}'\n", "too short"),
    ("tokenizer:\n  tokens: {'<|x|>': {source: /no/such/model}}\n", "which the recipe does not merge"),
    ("tokenizer:\n  tokens: {'<|x|>': {source: {kind: model_token, model: @a, token: '<|nope|>'}}}\n",
     "does not have it"),
    ("tokenizer:\n  tokens: {'<|x|>': {source: {kind: model_token, model: @a, token_id: 9999}}}\n", "has 256 rows"),
    ("tokenizer:\n  tokens: {'<|im_end|>': {source: @a}}\n", "does not have it"),
    ("tokenizer:\n  tokens: {'<|x|>': {force: true}}\n", "has no source"),
    ("tokenizer: {pad_to_multiple_of: 0}\n", "at least 1"),
])
def test_bad_tokenizer_settings_are_one_line_errors(vocabs, tmp_path, tail, message):
    recipe = _recipe(tmp_path, _merge("linear", vocabs, ("a", "chat"), _with_paths(tail, vocabs)))
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
    assert len(result.output.strip().splitlines()) == 1


def test_added_tokens_with_different_settings_keep_the_first(vocabs, tmp_path):
    """mergekit refuses no special-token conflict: a token added by two models with different settings keeps the
    first model's (a warning in mergekit); composer does the same and says so in the plan."""
    other = tmp_path / "chat2"
    shutil.copytree(vocabs["chat"], other)
    doc = json.loads((other / "tokenizer.json").read_text())
    for t in doc["added_tokens"]:
        if t["content"] == CHAT_TOKENS[0]:
            t["special"] = False
    (other / "tokenizer.json").write_text(json.dumps(doc))
    text = f"merge_method: linear\nparameters: {{weight: 0.5}}\n{UNION}base_model: {vocabs['a']}\nmodels:\n" + "".join(
        f"  - model: {m}\n" for m in (vocabs["a"], vocabs["chat"], other))
    result = CliRunner().invoke(main, [str(_recipe(tmp_path, text)), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert any(CHAT_TOKENS[0] in n and "first" in n for n in notes), notes
