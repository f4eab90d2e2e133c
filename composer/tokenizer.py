"""Tokenizer files: which ones a model folder has, and whether two folders share a vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

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
    if _vocabulary(tokenizer.path) != _vocabulary(embeddings.path):
        raise PlanError(
            f"'{tokenizer.name}', whose tokenizer the output ships, has a different vocabulary from "
            f"'{embeddings.name}', whose embeddings it takes: set tokenizer_source: base (or a model's name) to "
            "align the embeddings by token"
        )
