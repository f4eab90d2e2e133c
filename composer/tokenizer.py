"""Tokenizer files: which ones a model folder has, and whether two folders share a vocabulary."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from composer.errors import PlanError
from composer.filecheck import check_inside, is_regular
from composer.sources import SourceModel

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt",
)


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a folder, each refused if it is not a regular file inside it (they are copied into
    the output: a link out of the folder would publish an unrelated file)."""
    files = [folder / f for f in TOKENIZER_FILES if is_regular(folder / f)]
    for file in files:
        check_inside(folder, file)
    return files


def _vocabulary(folder: Path) -> object:
    """What identifies a tokenizer's vocabulary: tokenizer.json's model and added tokens, else the vocab files."""
    if (folder / "tokenizer.json").is_file():
        doc = json.loads((folder / "tokenizer.json").read_text())
        return doc.get("model"), doc.get("added_tokens")
    return tuple((folder / f).read_bytes() for f in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
                 if (folder / f).is_file())


def check_vocabulary(tokenizer: SourceModel, embeddings: SourceModel) -> None:
    """The tokenizer the output ships must index the embedding rows it ships."""
    if tokenizer.name == embeddings.name or tokenizer.path is None or embeddings.path is None:
        return
    if not tokenizer_files(tokenizer.path) or not tokenizer_files(embeddings.path):
        return  # no tokenizer to compare with: assumed the same, as mergekit assumes (the row counts were checked)
    if _vocabulary(tokenizer.path) != _vocabulary(embeddings.path):
        raise PlanError(
            f"'{tokenizer.name}', whose tokenizer the output ships, has a different vocabulary from "
            f"'{embeddings.name}', whose embeddings it takes: set tokenizer_source: base (or a model's name) to "
            "align the embeddings by token"
        )


# ---- the output tokenizer: union, base or a model's vocabulary, added tokens, chat template -------------------------
#
# mergekit 0.1.5 (mergekit/tokenizer/build.py) builds it with transformers, and so does composer, call for call where
# the result depends on it: the base tokenizer without the tokens whose id is at or past its config's vocab_size
# (BPE only), or the named model's, or for `union` the base's plus, in order, every other model's tokens the base
# lacks (plain tokens first, added tokens after, with the first model's settings where two differ), plus the
# `tokens:` entries the vocabulary lacks. Where mergekit's order is a hash order (a model's plain new tokens, and the
# models after the base, which it keeps in a set), composer's is the recipe's: models in the order the recipe names
# them, each one's new tokens by id. The README states it; tests/test_tokenizer.py pins it.


def _load(folder: Path):
    """A fresh transformers tokenizer from `folder` (callers may change it)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any loading failure means the same thing here
        raise PlanError(f"cannot load the tokenizer in {folder} ({str(exc).splitlines()[0][:200]}): fix its "
                        "tokenizer files or drop the recipe's tokenizer settings") from None


def config_vocab_size(model: SourceModel) -> int | None:
    config = model.config
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


def _strip(tok, size: int, name: str):
    """`tok` without the tokens whose id is `size` or more (they have no embedding row), as mergekit strips them."""
    import tokenizers

    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    doc = json.loads(tok._tokenizer.to_str())
    if doc["model"]["type"] != "BPE":
        raise PlanError(f"'{name}''s tokenizer has {len(unused)} tokens past its vocab_size ({size}) and is a "
                        f"{doc['model']['type']} tokenizer, which cannot drop them (mergekit: BPE only): use "
                        "tokenizer_source: the name of a model whose tokenizer fits")
    doc["added_tokens"] = [e for e in doc["added_tokens"] if e["id"] < size]
    doc["model"]["vocab"] = {t: i for t, i in doc["model"]["vocab"].items() if t not in unused}

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(doc))
    return tok


def _reload(tok):
    """A copy of `tok`, saved and loaded back, as mergekit copies the base tokenizer before adding to it."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp)


def _union(base_tok, others: list[tuple[str, object, int]], notes: list[str]):
    """The base tokenizer plus every token of `others` ((name, tokenizer, vocab size), base first) it lacks."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    first: dict[str, str] = {}
    for name, tok, size in others:
        decoder = tok.added_tokens_decoder
        contents = {info.content for info in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in contents:
                plain.setdefault(t)
        for i, info in sorted(decoder.items()):
            if i >= size:
                continue
            if info.content not in added:
                added[info.content], first[info.content] = info, name
            elif added[info.content] != info and not any(info.content in n for n in notes):
                notes.append(f"token {info.content!r} is added with different settings by '{first[info.content]}' "
                             f"and '{name}': the union keeps the first's, as mergekit does")
    out = _reload(base_tok)
    known = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in known:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass(frozen=True, eq=False)
class OutputTokenizer:
    """What the output's tokenizer files are: `files_from`'s, copied byte for byte, or `built`, a transformers
    tokenizer saved with save_pretrained (a union, a stripped or extended vocabulary, a chat template)."""

    vocab: Mapping[str, int]  # token -> id of the output vocabulary (added tokens included)
    model_vocabs: Mapping[str, Mapping[str, int]]  # each input's token -> id, as its rows are looked up
    files_from: Path | None = None
    built: object = None
    template: str | None = None  # how the chat template was chosen (None: the tokenizer's own)
    description: str = ""
    notes: tuple[str, ...] = ()

    def write(self, folder: Path) -> None:
        if self.built is not None:
            self.built.save_pretrained(str(folder))
        elif self.files_from is not None:
            for file in tokenizer_files(self.files_from):
                shutil.copyfile(file, folder / file.name)


def build_output_tokenizer(recipe, sources: Mapping[str, SourceModel], base: str) -> OutputTokenizer | None:
    """The output tokenizer a recipe's `tokenizer_source`, `tokenizer:` block and `chat_template` ask for; None when
    it asks for none of them (the base's files are copied as they are)."""
    from composer.templates import resolve_template

    source = recipe.vocabulary_source
    if source is None and recipe.chat_template is None:
        return None
    models = merged_models(recipe)
    for m in dict.fromkeys([base, *models, *([source] if source not in (None, "base", "union") else [])]):
        if sources[m].path is None:
            raise PlanError(f"the output tokenizer needs '{m}''s tokenizer files, which a plan from headers alone "
                            "does not have: run without --dry-run, or download the model")
    base_model = sources[base]
    if not tokenizer_files(base_model.path):
        if source is None:
            return None  # no tokenizer to put a template into, as mergekit warns
        raise PlanError(f"the base model '{base}' has no tokenizer files, which {source!r} vocabularies start from: "
                        "add them, or name a model with tokenizer_source")
    base_tok = _strip(_load(base_model.path), config_vocab_size(base_model) or 2**62, base)
    model_vocabs: dict[str, Mapping[str, int]] = {base: base_tok.get_vocab()}
    toks = {base: base_tok}
    for m in models:
        if m != base and tokenizer_files(sources[m].path):
            toks[m] = _load(sources[m].path)
            model_vocabs[m] = toks[m].get_vocab()
    for m in models:
        model_vocabs.setdefault(m, model_vocabs[base])  # no tokenizer: the base's, as mergekit assumes
    changed, notes = False, []
    if source in (None, "base"):
        out, files_from = base_tok, base_model.path
        changed = len(model_vocabs[base]) != len(_load(base_model.path).get_vocab())
        description = f"the base model '{base}''s" + (" (without the tokens past its vocab_size)" if changed else "")
    elif source == "union":
        out = _union(base_tok, [(m, toks[m], config_vocab_size(sources[m]) or len(model_vocabs[m])) for m in toks],
                     notes)
        files_from, changed = None, True
        description = f"the union of {len(toks)} models' vocabularies"
    else:
        if not tokenizer_files(sources[source].path):
            raise PlanError(f"tokenizer_source '{source}' has no tokenizer files in {sources[source].path}")
        out, files_from = _load(sources[source].path), sources[source].path
        description = f"'{source}''s"
    spec = recipe.tokenizer
    for token in (spec.tokens or {}) if spec else {}:
        if token not in out.get_vocab():
            out.add_tokens(token)
            changed = True
    template_note = None
    if recipe.chat_template is not None:
        templates = []
        for m in models:
            if sources[m].path is not None and tokenizer_files(sources[m].path):
                t = (toks[m] if m in toks else _load(sources[m].path)).chat_template
                templates.append(t.get("default") if isinstance(t, dict) else t)
        text, template_note = resolve_template(recipe.chat_template, templates)
        if text is not None:
            out.chat_template = text
            changed = True
    vocab = dict(out.get_vocab())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise PlanError(f"the output tokenizer ({description}) does not number its tokens 0..{len(vocab) - 1}: "
                        "it cannot define the output's embedding rows")
    return OutputTokenizer(vocab=vocab, model_vocabs=model_vocabs, files_from=None if changed else files_from,
                           built=out if changed else None, template=template_note, description=description,
                           notes=tuple(notes))


def merged_models(recipe) -> list[str]:
    """The models a recipe merges or stacks (and its base): without a model named only as the tokenizer source."""
    return recipe.model_copy(update={"tokenizer_source": None, "tokenizer": None}).referenced_models()
