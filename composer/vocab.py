"""Vocabulary alignment: the rows of embedding-like tensors re-indexed to the output tokenizer, as mergekit's
`tokenizer_source` and `tokenizer:` block do (mergekit/tokenizer/embed.py, PermutedVocabulary).

The output vocabulary comes from composer.tokenizer (the base's, a model's, or the union). Each model's
`embed_tokens` and `lm_head` rows are taken by token string. A token a model lacks gets, in every model: the row
a `tokens:` rule names (a model's row of the token, a model's row of another token or id, or zeros; with `force`
every model takes it); else the row of the one model that has it; else the base model's row, if the base is merged
and has it; else the mean of the rows of the models that have it (summed in the working dtype, then divided); zeros
if no model has it. Rows past the vocabulary (`pad_to_multiple_of`) are each model's mean aligned row. The output
then has one row per token (padded) and `vocab_size` says so.

The aligned inputs are read row block by row block like any other input (composer.blocks.read_block), so
alignment costs no whole-tensor memory and composes with every merge method, slerp and ties statistics included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from composer.errors import PlanError
from composer.recipe_errors import suggest
from composer.sources import Derived, SourceModel, TensorInfo

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def is_vocabulary_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


PAD = -2  # a row past the vocabulary (pad_to_multiple_of): the mean of the model's aligned rows


@dataclass(frozen=True, eq=False)
class AlignedRows(Derived):
    """One model's vocabulary tensor with its rows in the output vocabulary's order; stands in for a TensorInfo."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    tensors: tuple[TensorInfo, ...]  # every merged model's tensor, in the merge's order
    own: int  # which of them this input is
    rows: tuple[int, ...]  # per output row: this model's row, -1 (a default row) or PAD
    defaults: Mapping[int, tuple[tuple[int, int], ...]]  # output row -> (model, row) pairs: one row, a mean, or zeros
    real: int = 0  # rows of the vocabulary proper; rows past it are PAD rows
    pad_means: dict = field(default_factory=dict, compare=False)  # dtype -> this model's mean aligned row (computed once)
    @property
    def source(self) -> TensorInfo:
        return self.tensors[self.own]


@dataclass(frozen=True)
class TokenRule:
    """A `tokens:` entry, resolved: the default row of one output row comes from `model` (its row of the same token,
    or `row`), or is zeros (model None); with `force`, every model takes it, even one that has the token."""

    token: str
    model: str | None
    row: int | None = None  # a model_token source: that model's row; None: the model's row of this token
    force: bool = False
    none: bool = False  # no source: only valid where no default row is needed


@dataclass(frozen=True)
class Alignment:
    """The output vocabulary's size (padded) and, per model, each output row's source row (-1: the model lacks the
    token), with the `tokens:` rules by output row."""

    size: int
    rows: Mapping[str, tuple[int, ...]]
    real: int = 0  # the vocabulary's own size; size - real rows of padding
    rules: Mapping[int, TokenRule] = field(default_factory=dict)

    def inputs(self, models: Sequence[str], infos: Sequence[TensorInfo], base: str | None) -> list[AlignedRows]:
        """The aligned stand-ins of one vocabulary tensor, merged from `models` (one TensorInfo each): for each
        output row a model lacks, mergekit's default (PermutedVocabulary): a `tokens:` rule; else the row of the one
        model that has the token; else the base model's, if merged and has it; else the mean of those that have
        it; else zeros."""
        unique = list(dict.fromkeys(models))
        perms = [self.rows[m] for m in unique]
        real = self.real or self.size
        defaults: dict[int, tuple[tuple[int, int], ...]] = {}
        forced: set[int] = set()
        for r in range(real):
            present = [(k, p[r]) for k, p in enumerate(perms) if p[r] >= 0]
            rule = self.rules.get(r)
            if rule is not None:
                if not rule.force and len(present) == len(perms):
                    continue
                defaults[r] = self._rule_row(rule, unique, infos, models, perms, r)
                if rule.force:
                    forced.add(r)
                continue
            if len(present) == len(perms):
                continue
            if len(present) > 1 and base in unique and perms[unique.index(base)][r] >= 0:
                present = [(unique.index(base), perms[unique.index(base)][r])]
            defaults[r] = tuple(present)
        tensors = tuple(infos[models.index(m)] for m in unique)
        pad = (PAD,) * (self.size - real)
        out = []
        for m, info in zip(models, infos):
            rows = tuple(-1 if r in forced else v for r, v in enumerate(self.rows[m][:real])) + pad
            out.append(AlignedRows(info.name, info.dtype, (self.size, *info.shape[1:]), tensors, unique.index(m),
                                   rows, defaults, real if pad else 0))
        return out

    @staticmethod
    def _rule_row(rule: TokenRule, unique, infos, models, perms, r) -> tuple[tuple[int, int], ...]:
        if rule.none:
            raise PlanError(f"tokens: '{rule.token}' needs an embedding (a model lacks it, or force is set) but its "
                            "entry has no source: give source: a model, a model_token or zero")
        if rule.model is None:
            return ()
        if rule.model not in unique:
            raise PlanError(f"tokens: '{rule.token}' takes its embedding from '{rule.model}', which is not merged "
                            f"into '{infos[0].name}' (merged: {', '.join(unique)}): name one of them")
        k = unique.index(rule.model)
        if rule.row is None:
            if perms[k][r] < 0:
                raise PlanError(f"tokens: '{rule.token}' takes its embedding from '{rule.model}', whose tokenizer "
                                "does not have it: use a model_token source to pick another token's row")
            return ((k, perms[k][r]),)
        rows = infos[models.index(rule.model)].shape[0]
        if not 0 <= rule.row < rows:
            raise PlanError(f"tokens: '{rule.token}' takes row {rule.row} of '{rule.model}', which has {rows} rows in "
                            f"'{infos[0].name}': use a token id below {rows}")
        return ((k, rule.row),)


def _rows(model: SourceModel) -> int:
    info = next((i for n, i in model.tensors.items() if n.endswith("embed_tokens.weight")), None)
    return info.shape[0] if info is not None else int(model.config.get("vocab_size", 0))


def align(out, recipe, models: Sequence[SourceModel]) -> Alignment | None:
    """Each model's rows in the vocabulary of `out` (a composer.tokenizer.OutputTokenizer), with the recipe's
    `tokens:` rules and padding; None where every model already has the output's rows."""
    from composer.tokenizer import config_vocab_size

    order = sorted(out.vocab, key=out.vocab.get)
    real = len(order)
    spec = recipe.tokenizer
    pad = spec.pad_to_multiple_of if spec is not None else None
    size = -(-real // pad) * pad if pad else real
    rows = {}
    for m in models:
        vocab = out.model_vocabs[m.name]
        limit = config_vocab_size(m) or len(vocab)
        rows[m.name] = tuple(vocab[t] if t in vocab and vocab[t] < limit else -1 for t in order)
    rules: dict[int, TokenRule] = {}
    known = list(out.model_vocabs)
    for token, entry in ((spec.tokens or {}) if spec is not None else {}).items():
        src, r = entry.source, out.vocab[token]
        model = src if isinstance(src, str) else getattr(src, "model", None)
        if model is not None and model not in known:
            raise PlanError(f"tokens: '{token}' takes its embedding from '{model}', which the recipe does not "
                            f"merge{suggest(model, known)}: name one of {', '.join(known)}")
        if src is None:
            rules[r] = TokenRule(token, None, force=entry.force, none=True)
        elif isinstance(src, str) or src.kind == "zero":
            rules[r] = TokenRule(token, model, force=entry.force)
        else:
            row = src.token_id
            if row is None:
                row = out.model_vocabs[model].get(src.token)
                if row is None:
                    raise PlanError(f"tokens: '{token}' takes the embedding of token '{src.token}' of '{model}', "
                                    f"whose tokenizer does not have it{suggest(src.token, list(out.model_vocabs[model]))}")
            rules[r] = TokenRule(token, model, row=row, force=entry.force)
    identity = tuple(range(real))
    if not rules and size == real and all(rows[m.name] == identity and _rows(m) == real for m in models):
        return None
    return Alignment(size, rows, real, rules)


def _pad_mean(info: AlignedRows, sources, dtype):
    """The mean of this model's aligned rows of the vocabulary proper, in `dtype` (summed in float64, row block by
    row block; mergekit takes torch.mean of the whole aligned matrix in the working dtype)."""
    import torch

    key = str(dtype)
    if key not in info.pad_means:
        width = math.prod(info.shape[1:])
        acc = torch.zeros(width, dtype=torch.float64)
        step = max(1, (1 << 20) // max(1, width))
        for r0 in range(0, info.real, step):
            r1 = min(info.real, r0 + step)
            acc += gather(info, sources, r0 * width, r1 * width, dtype).reshape(-1, width).to(torch.float64).sum(0)
        info.pad_means[key] = (acc / info.real).to(dtype)
    return info.pad_means[key]


def _take(sources, t, idx):
    """Rows `idx` (an int64 tensor) of a model's vocabulary tensor, as a (len(idx), width) tensor in its dtype: a
    view of the mapped file indexed, or, for a computed stand-in (a LoRA-merged embedding), the rows it spans."""
    width = math.prod(t.shape[1:])
    if isinstance(t, Derived):
        if not len(idx):
            return t.rows(sources, 0, 0)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return t.rows(sources, lo, hi)[idx - lo]
    return sources.tensor(t).reshape(-1, width)[idx]


def gather(info: AlignedRows, sources, start: int, stop: int, dtype):
    """Elements [start, stop) of the aligned tensor, flat, in `dtype` (mergekit aligns after loading in the
    recipe's dtype). Only the rows indexed are read (from `sources`, a composer.reading.Sources) and converted."""
    import torch

    width = math.prod(info.shape[1:])
    r0, r1 = start // width, -(-stop // width)
    idx = torch.tensor(info.rows[r0:r1], dtype=torch.int64)
    out = torch.zeros((r1 - r0, width), dtype=dtype)
    own = idx >= 0
    out[own] = _take(sources, info.source, idx[own]).to(dtype)
    for r in (r0 + torch.nonzero(~own).reshape(-1)).tolist():
        if info.rows[r] == PAD:
            out[r - r0] = _pad_mean(info, sources, dtype)
            continue
        pairs = info.defaults[r]
        if len(pairs) == 1:
            k, row = pairs[0]
            out[r - r0] = _take(sources, info.tensors[k], torch.tensor([row]))[0].to(dtype)
        elif pairs:
            acc = torch.zeros(width, dtype=dtype)
            for k, row in pairs:
                acc = acc + _take(sources, info.tensors[k], torch.tensor([row]))[0].to(dtype)
            out[r - r0] = acc / len(pairs)
    return out.reshape(-1)[start - r0 * width: stop - r0 * width]
