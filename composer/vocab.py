"""Vocabulary alignment: the rows of embedding-like tensors re-indexed to the output tokenizer, as mergekit's
`tokenizer_source` does (mergekit/tokenizer/build.py and embed.py, PermutedVocabulary).

With `tokenizer_source: base` (the base model's tokenizer, without tokens whose id is at or past its config's
vocab_size) or a model name (that model's tokenizer), the output vocabulary is that tokenizer's, and each model's
`embed_tokens` and `lm_head` rows are taken by token string. A token a model lacks gets, in every model:
the row of the one model that has it; else the base model's row, if the base is merged and has it; else the mean
of the rows of the models that have it (summed in the working dtype, then divided); zeros if no model has it.
The output then has one row per token and `vocab_size` says so.

The aligned inputs are read row block by row block like any other input (composer.blocks.read_block), so
alignment costs no whole-tensor memory and composes with every merge method, slerp and ties statistics included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from composer.errors import PlanError
from composer.sources import SourceModel, TensorInfo

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def is_vocabulary_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


@dataclass(frozen=True, eq=False)
class AlignedRows:
    """One model's vocabulary tensor with its rows in the output vocabulary's order; stands in for a TensorInfo."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    tensors: tuple[TensorInfo, ...]  # every merged model's tensor, in the merge's order
    own: int  # which of them this input is
    rows: tuple[int, ...]  # per output row: this model's row, or -1 (a default row)
    defaults: Mapping[int, tuple[tuple[int, int], ...]]  # output row -> (model, row) pairs: one row, a mean, or zeros
    file = None
    offset = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def source(self) -> TensorInfo:
        return self.tensors[self.own]


@dataclass(frozen=True)
class Alignment:
    """The output vocabulary's size and, per model, each output row's source row (-1: the model lacks the token)."""

    size: int
    rows: Mapping[str, tuple[int, ...]]

    def inputs(self, models: Sequence[str], infos: Sequence[TensorInfo], base: str | None) -> list[AlignedRows]:
        """The aligned stand-ins of one vocabulary tensor, merged from `models` (one TensorInfo each)."""
        unique = list(dict.fromkeys(models))
        perms = [self.rows[m] for m in unique]
        defaults: dict[int, tuple[tuple[int, int], ...]] = {}
        for r in range(self.size):
            present = [(k, p[r]) for k, p in enumerate(perms) if p[r] >= 0]
            if len(present) == len(perms):
                continue
            if len(present) > 1 and base in unique and perms[unique.index(base)][r] >= 0:
                present = [(unique.index(base), perms[unique.index(base)][r])]
            defaults[r] = tuple(present)
        tensors = tuple(infos[models.index(m)] for m in unique)
        return [AlignedRows(info.name, info.dtype, (self.size, *info.shape[1:]), tensors, unique.index(m),
                            self.rows[m], defaults) for m, info in zip(models, infos)]


@lru_cache(maxsize=32)
def _vocabulary(folder: Path) -> dict[str, int] | None:
    """The tokenizer's token -> id map, as transformers loads it (added tokens included); None without one."""
    from composer.tokenizer import tokenizer_files

    if not tokenizer_files(folder):
        return None
    import transformers

    try:
        return dict(transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as exc:  # noqa: BLE001 - any loading failure means the same thing here
        raise PlanError(f"cannot load the tokenizer in {folder} to align vocabularies ({exc}): fix or remove "
                        "tokenizer_source") from None


def _rows(model: SourceModel) -> int:
    info = next((i for n, i in model.tensors.items() if n.endswith("embed_tokens.weight")), None)
    return info.shape[0] if info is not None else int(model.config.get("vocab_size", 0))


def align(tokenizer_source: str, tokenizer_model: SourceModel, base: SourceModel,
          models: Sequence[SourceModel]) -> Alignment | None:
    """The alignment `tokenizer_source` asks for, or None where every model already has the output's rows."""
    for m in (tokenizer_model, base, *models):
        if m.path is None:
            raise PlanError(f"aligning vocabularies needs '{m.name}''s tokenizer files, which a plan from headers "
                            "alone does not have")
    out = _vocabulary(tokenizer_model.path)
    if out is None:
        raise PlanError(f"tokenizer_source '{tokenizer_source}' has no tokenizer files in {tokenizer_model.path}")
    if tokenizer_source == "base":  # mergekit strips the base tokenizer's tokens past its vocab_size
        size = int(base.config.get("vocab_size") or len(out))
        out = {tok: i for tok, i in out.items() if i < size}
    if sorted(out.values()) != list(range(len(out))):
        raise PlanError(f"the tokenizer of '{tokenizer_model.name}' does not number its tokens 0..{len(out) - 1}: "
                        "it cannot define the output's embedding rows")
    order = sorted(out, key=out.get)
    rows = {}
    base_vocab = _vocabulary(base.path) or out
    for m in models:
        vocab = _vocabulary(m.path) or base_vocab  # no tokenizer: assumed the base's, as mergekit does
        limit = int(m.config.get("vocab_size") or _rows(m))
        rows[m.name] = tuple(vocab[t] if t in vocab and vocab[t] < limit else -1 for t in order)
    identity = tuple(range(len(out)))
    if all(rows[m.name] == identity and _rows(m) == len(out) for m in models):
        return None
    return Alignment(len(out), rows)


def gather(info: AlignedRows, load_rows, start: int, stop: int, dtype):
    """Elements [start, stop) of the aligned tensor, flat, in `dtype` (mergekit aligns after loading in the
    recipe's dtype). load_rows(tensor_info) returns a model's whole tensor, flat, as a view of its mapped file:
    only the rows indexed below are read and converted."""
    import torch

    width = math.prod(info.shape[1:])
    r0, r1 = start // width, -(-stop // width)
    idx = torch.tensor(info.rows[r0:r1], dtype=torch.int64)
    src = load_rows(info.source).reshape(-1, width)
    out = torch.zeros((r1 - r0, width), dtype=dtype)
    own = idx >= 0
    out[own] = src[idx[own]].to(dtype)
    for r in (r0 + torch.nonzero(~own).reshape(-1)).tolist():
        pairs = info.defaults[r]
        if len(pairs) == 1:
            k, row = pairs[0]
            out[r - r0] = load_rows(info.tensors[k]).reshape(-1, width)[row].to(dtype)
        elif pairs:
            acc = torch.zeros(width, dtype=dtype)
            for k, row in pairs:
                acc = acc + load_rows(info.tensors[k]).reshape(-1, width)[row].to(dtype)
            out[r - r0] = acc / len(pairs)
    return out.reshape(-1)[start - r0 * width: stop - r0 * width]
