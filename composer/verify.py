"""`compose verify OUT`: check a composed folder against the sources its provenance names, tensor by tensor, and
for a block expansion check that the output's logits equal the base model's bit for bit.

The tensor check streams: each tensor is read in pieces of PIECE_BYTES from its output shard and from its source
file (os.pread, no mapping of whole files), so memory stays at a few pieces whatever the model size. What each kind
of tensor must be (composer_provenance.json says which kind it is):

- copied (a byte copy): the same bytes as the source tensor;
- converted (a copy into another dtype): the source cast through the recipe's `dtype` (if any) to the output dtype,
  as composer.execute computes it, compared bit for bit;
- scaled: the source through the recipe's dtype, times the scale in float32, back through the recipe's dtype, to
  the output dtype (composer.execute again), bit for bit;
- zeroed: every element exactly zero;
- merged, and vocabulary rows re-indexed by token (tokenizer_source): not re-derived (that would be a second merge
  run, with the seed of the random methods, which the provenance does not record); their shape and dtype are
  checked and their values must be finite.

The logits check loads the base model, runs a fixed probe through it in float32 (or
`--dtype bfloat16`, half the memory), frees it, then does the same for
the output: it needs memory for the larger of the two in float32 (4 bytes a parameter) plus the activations of a
few tokens.
"""
from __future__ import annotations

import gc
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import click

from composer.dtypes import DTYPE_NAME, FLOAT_DTYPES, ITEMSIZE, ST_DTYPE, torch_dtype
from composer.errors import ComposerError, CorruptFileError, SourceError
from composer.outputs import PROVENANCE_FILE, RECIPE_FILE
from composer.sources import (INDEX_NAME, SINGLE_NAME, Derived, SourceModel, TensorInfo, open_sources,
                              parse_hub_id, read_header)
from composer.vocab import is_vocabulary_tensor

PIECE_BYTES = 16 * 2**20  # read from each file at a time
# Token ids of the logits probe, reduced modulo the vocabulary size (those of tests/tinymodels.DEFAULT_INPUT_IDS first).
PROBE_IDS = (1, 17, 42, 99, 5, 128, 64, 200, 7, 33, 250, 2, 311, 73, 12, 150)
DEFAULT_MAX_TOKENS = 8
SHOWN = 5  # problems named in the human report (all of them are in --json)
EXIT_FAILED = 1  # the output does not match its provenance
EXIT_ERROR = 2  # could not verify: no provenance, unreadable files, sources not found

KINDS = ("copied", "converted", "zeroed", "scaled", "not_rederived")


def probe_ids(n: int, vocab_size: int) -> list[int]:
    """`n` fixed token ids below `vocab_size`: PROBE_IDS, then the same shifted by 101 per repetition."""
    return [(PROBE_IDS[i % len(PROBE_IDS)] + 101 * (i // len(PROBE_IDS))) % vocab_size for i in range(n)]


# ----------------------------------------------------------------------------------------------------- reading


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: cannot read the {what} ({exc.__class__.__name__}): "
                               "compose the output again") from None


def read_provenance(out: Path) -> dict[str, Any]:
    if not out.is_dir():
        raise SourceError(f"{out} is not a folder: give the output folder compose wrote")
    path = out / PROVENANCE_FILE
    try:
        prov = _load_json(path, "provenance")
    except FileNotFoundError:
        raise SourceError(f"{out} has no {PROVENANCE_FILE}: verify checks folders written by compose "
                          "(compose RECIPE -o OUT writes it)") from None
    if (not isinstance(prov, dict) or not str(prov.get("format", "")).startswith("composer-provenance/")
            or not isinstance(prov.get("tensors"), dict)):
        raise CorruptFileError(f"{path}: not a composer provenance file (no format or tensors): compose the output "
                               "again")
    return prov


def _recipe_facts(out: Path) -> tuple[str | None, bool]:
    """(the dtype values were rounded through, whether vocabulary rows were re-indexed) from the recipe compose
    wrote beside the weights."""
    from composer.recipe import DTYPES, load_recipes

    if not (out / RECIPE_FILE).is_file():
        raise SourceError(f"{out} has no {RECIPE_FILE}: verify needs the recipe compose wrote beside the weights "
                          "(it says which dtype values were rounded through)")
    docs = load_recipes(out / RECIPE_FILE)
    recipe = docs[-1][0]
    via = ST_DTYPE[DTYPES[recipe.dtype]] if recipe.dtype else None
    return via, recipe.vocabulary_source is not None


def output_table(out: Path) -> tuple[dict[str, TensorInfo], list[dict[str, str]]]:
    """The output's tensors from its shard headers (data is not read), and what is wrong with the index: shards it
    names that are missing, tensors it places in the wrong shard or leaves out."""
    problems: list[dict[str, str]] = []
    table: dict[str, TensorInfo] = {}
    index = out / INDEX_NAME
    if index.is_file():
        data = _load_json(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"{index}: not a valid safetensors index (no weight_map): compose the output again")
        for shard in dict.fromkeys(weight_map.values()):
            file = out / shard
            if not file.is_file():
                problems.append({"tensor": shard, "check": "shard", "detail": f"shard {shard} named by the index "
                                                                                "is missing"})
                continue
            for name, info in read_header(file).items():
                if name in table:
                    problems.append({"tensor": name, "check": "index",
                                     "detail": f"in both {table[name].file.name} and {shard}"})
                table.setdefault(name, info)
        for name, info in table.items():
            if name not in weight_map:
                problems.append({"tensor": name, "check": "index",
                                 "detail": f"in {info.file.name} but not in the index (loaders will not find it)"})
            elif weight_map[name] != info.file.name:
                problems.append({"tensor": name, "check": "index",
                                 "detail": f"the index says {weight_map[name]}, it is in {info.file.name}"})
        return table, problems
    single = out / SINGLE_NAME
    files = [single] if single.is_file() else sorted(out.glob("*.safetensors"))
    if len(files) != 1:
        raise SourceError(f"{out} has no {SINGLE_NAME} or {INDEX_NAME}: not a complete compose output")
    return read_header(files[0]), problems


def open_provenance_sources(prov: Mapping[str, Any], out: Path, overrides: Mapping[str, str] | None,
                            hub: Any = None) -> dict[str, SourceModel]:
    """The models the provenance names, opened as compose opened them (headers only): --model NAME=PATH, else a
    folder from the current folder, from the recipe's folder (recorded at compose time), beside OUT or among OUT's
    stages (OUT.stages/NAME), else a Hub id at the commit the provenance recorded."""
    from composer.stages import stages_folder

    names = list(dict.fromkeys([
        *(s["model"] for t in prov["tensors"].values() for s in t.get("sources", ())),
        *([prov["base_model"]] if prov.get("base_model") else []),
    ]))
    commits = {(h.get("hub_id"), h.get("revision")): h.get("commit") for h in prov.get("hub_sources") or ()
               if isinstance(h, dict)}
    recipe_folder = prov.get("recipe_folder")
    search = (*([Path(recipe_folder)] if isinstance(recipe_folder, str) and recipe_folder else []),
              stages_folder(out), out.parent)
    opened: dict[str, SourceModel] = {}
    for name in names:
        ref = parse_hub_id(name)
        pinned = name
        if ref is not None and not (overrides and name in overrides) and commits.get(ref):
            pinned = f"{ref[0]}@{commits[ref]}"  # the exact commit the output was built from
        try:
            model = open_sources([pinned], search, {pinned: overrides[name]} if overrides and name in overrides
                                 else None, hub=hub)[pinned]
        except SourceError as exc:
            raise SourceError(f"{exc} (verify looks from the current folder, the recipe's folder and beside {out}; "
                              f"name the folder with --model {name}=PATH)") from None
        opened[name] = model
    return opened


# ---------------------------------------------------------------------------------------------------- checking


class _Files:
    """Files opened once, read-only, read piece by piece with pread."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, file: Path, offset: int, size: int) -> bytes:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
            os.posix_fadvise(self._fds[file], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        parts, done = [], 0
        while done < size:
            got = os.pread(self._fds[file], size - done, offset + done)
            if not got:
                raise CorruptFileError(f"{file}: ends early (at byte {offset + done}): the file is truncated")
            parts.append(got)
            done += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pieces(numel: int, itemsizes: Iterable[int]) -> Iterable[tuple[int, int]]:
    step = max(1, PIECE_BYTES // max(itemsizes))
    for a in range(0, numel, step):
        yield a, min(numel, a + step)


def _value(raw: bytes, dtype: str) -> str:
    """One element's bytes as a number."""
    fmt = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B",
           "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<?"}.get(dtype)
    if dtype == "BF16":  # the upper half of a float32
        fmt, raw = "<f", bytes(2) + raw
    if fmt is None:
        return "0x" + raw.hex()
    value = struct.unpack(fmt, raw)[0]
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _first_diff(a: bytes, b: bytes) -> int:
    lo, hi = 0, len(a)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])


class Checker:
    def __init__(self, out: Path, prov: Mapping[str, Any], models: Mapping[str, SourceModel],
                 via: str | None, aligned_vocab: bool, vocab_size: int | None) -> None:
        self.out, self.prov, self.models = out, prov, models
        self.via, self.aligned_vocab, self.vocab_size = via, aligned_vocab, vocab_size
        self.files = _Files()
        self.sources = None  # a composer.reading.Sources, for sources computed while reading (LoRA-merged weights)

    # Each check returns (kind, problem detail or None, note for a tensor not re-derived or None).

    def check(self, name: str, rec: Mapping[str, Any], got: TensorInfo) -> tuple[str, str | None, str | None]:
        status = rec.get("status")
        if status in ("router", "noised"):  # an MoE router, or expert tensors with random noise: not re-derivable
            if got.dtype != rec["dtype"]:
                return "mismatch", f"dtype is {got.dtype}, the provenance says {rec['dtype']}", None
            why = ("an MoE router, initialised from the gate mode" if status == "router" else
                   "MoE expert tensors with noise_scale / residual_scale") + ": dtype and finite values checked"
            problem = self._finite(got)
            return ("mismatch", problem, None) if problem else ("not_rederived", None, why)
        srcs = []
        for s in rec.get("sources", ()):
            model = self.models[s["model"]]
            info = model.tensors.get(s["tensor"])
            if info is None:
                return "mismatch", f"source '{s['model']}' has no tensor '{s['tensor']}' (the sources changed?)", None
            srcs.append((s["model"], info))
        if got.dtype != rec["dtype"]:
            return "mismatch", f"dtype is {got.dtype}, the provenance says {rec['dtype']}", None
        if not srcs:
            return "mismatch", "the provenance names no source", None
        if status == "stacked":  # MoE experts stacked into one tensor: each part, cast, in its place
            if got.numel != sum(info.numel for _, info in srcs):
                return "mismatch", f"{got.numel} elements, its {len(srcs)} stacked sources hold another number", None
            start = 0
            for model, info in srcs:
                problem = self._derived(got, info, model, None, start)
                if problem:
                    return "mismatch", problem, None
                start += info.numel
            return "converted", None, None
        first = srcs[0][1]
        aligned = self.aligned_vocab and is_vocabulary_tensor(name)
        if aligned:
            want = (self.vocab_size or got.shape[0], *first.shape[1:])
        else:
            want = first.shape
        if tuple(got.shape) != tuple(want):
            return "mismatch", f"shape {list(got.shape)}, its source gives {list(want)}", None
        op, status = rec["op"], rec.get("status")
        if op == "zeros":
            return self._zeros(got)
        if status == "merged" or aligned:
            why = (f"merged ({op}): shape, dtype and finite values checked" if status == "merged" else
                   "rows re-indexed to the output vocabulary by token: shape, dtype and finite values checked")
            problem = self._finite(got)
            return ("mismatch", problem, None) if problem else ("not_rederived", None, why)
        model, src = srcs[0]
        if isinstance(src, Derived):  # a LoRA-merged weight: computed from the model and its adapter, as composing
            problem = self._derived(got, src, model, None)
            return ("mismatch", problem, None) if problem else ("converted", None, None)
        if (op == "copy" and src.dtype == got.dtype and self.via in (None, src.dtype)) or src.dtype not in FLOAT_DTYPES:
            if op != "copy":
                return "mismatch", f"op {op} on a {src.dtype} tensor", None
            problem = self._same_bytes(got, src, model)
            return ("mismatch", problem, None) if problem else ("copied", None, None)
        if op not in ("copy", "scale"):
            return "mismatch", f"unknown op '{op}' in the provenance", None
        scale = (rec.get("params") or {}).get("scale") if op == "scale" else None
        if op == "scale" and not isinstance(scale, (int, float)):
            return "mismatch", "scaled, but the provenance records no scale", None
        problem = self._derived(got, src, model, scale)
        if problem:
            return "mismatch", problem, None
        if status == "zeroed":
            problem = self._zeros(got)[1]
            return ("mismatch", problem, None) if problem else ("zeroed", None, None)
        return ("scaled" if op == "scale" else "converted"), None, None

    def _same_bytes(self, got: TensorInfo, src: TensorInfo, model: str) -> str | None:
        size = ITEMSIZE[got.dtype]
        for a, b in _pieces(got.numel, [size]):
            mine = self.files.read(got.file, got.offset + a * size, (b - a) * size)
            theirs = self.files.read(src.file, src.offset + a * size, (b - a) * size)
            if mine != theirs:
                i = _first_diff(mine, theirs) // size
                return (f"element {a + i} is {_value(mine[i * size:(i + 1) * size], got.dtype)}, source "
                        f"{model}:{src.name} has {_value(theirs[i * size:(i + 1) * size], src.dtype)}")
        return None

    def _zeros(self, got: TensorInfo) -> tuple[str, str | None, str | None]:
        size = ITEMSIZE[got.dtype]
        for a, b in _pieces(got.numel, [size]):
            piece = self.files.read(got.file, got.offset + a * size, (b - a) * size)
            if piece.count(0) != len(piece):
                j = (len(piece) - len(piece.lstrip(b"\0"))) // size
                if got.dtype in FLOAT_DTYPES:  # -0.0 is zero too (x * 0 of a negative x)
                    import torch

                    nz = (torch.frombuffer(bytearray(piece), dtype=torch_dtype(got.dtype)) != 0).nonzero()
                    if not len(nz):
                        continue
                    j = int(nz[0])
                return ("mismatch", f"zeroed, but element {a + j} is "
                                    f"{_value(piece[j * size:(j + 1) * size], got.dtype)}", None)
        return "zeroed", None, None

    def _finite(self, got: TensorInfo) -> str | None:
        if got.dtype not in FLOAT_DTYPES:
            return None
        import torch

        size = ITEMSIZE[got.dtype]
        for a, b in _pieces(got.numel, [size]):
            x = torch.frombuffer(bytearray(self.files.read(got.file, got.offset + a * size, (b - a) * size)),
                                 dtype=torch_dtype(got.dtype))
            bad = (~torch.isfinite(x)).nonzero()
            if len(bad):
                return f"element {a + int(bad[0])} is {float(x[int(bad[0])])}, not finite"
        return None

    def _source(self, src, a: int, b: int):
        """Elements [a, b) of a source tensor in its dtype: read from its file, or computed (composer.sources.Derived,
        through a composer.reading.Sources opened on first use)."""
        import torch

        if isinstance(src, Derived):
            if self.sources is None:
                from composer.reading import Sources

                self.sources = Sources()
            return src.read(self.sources, a, b)
        size = ITEMSIZE[src.dtype]
        return torch.frombuffer(bytearray(self.files.read(src.file, src.offset + a * size, (b - a) * size)),
                                dtype=torch_dtype(src.dtype))

    def _derived(self, got: TensorInfo, src: TensorInfo, model: str, scale: float | None, start: int = 0
                 ) -> str | None:
        """src -> (the recipe's dtype) -> [float32 * scale -> the recipe's dtype] -> output dtype, as
        composer.execute._compute_into computes it; compared bit for bit with the output's elements from `start`."""
        import torch

        src_dt, out_dt = torch_dtype(src.dtype), torch_dtype(got.dtype)
        work = torch_dtype(self.via) if self.via else src_dt
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        s_size, o_size = ITEMSIZE[src.dtype], ITEMSIZE[got.dtype]
        for a, b in _pieces(src.numel, [s_size, o_size]):
            x = self._source(src, a, b).to(work)
            if scale is not None:
                x = (x.to(torch.float32) * scale).to(work)
            want = x.to(out_dt)
            have = torch.frombuffer(bytearray(self.files.read(got.file, got.offset + (start + a) * o_size,
                                                              (b - a) * o_size)), dtype=out_dt)
            wi, hi = want.view(ints[o_size]), have.view(ints[o_size])
            if not torch.equal(wi, hi):
                i = int((wi != hi).nonzero()[0])
                how = "".join([f" through {DTYPE_NAME[self.via]}" if self.via else "",
                               f" x {scale:g}" if scale is not None else "", f" as {DTYPE_NAME[got.dtype]}"])
                return (f"element {start + a + i} is {float(have[i]):.6g}, source {model}:{src.name}{how} gives "
                        f"{float(want[i]):.6g}")
        return None


def check_tensors(out: Path, prov: Mapping[str, Any], models: Mapping[str, SourceModel], progress=None
                  ) -> dict[str, Any]:
    via, aligned = _recipe_facts(out)
    config = {}
    if (out / "config.json").is_file():
        config = _load_json(out / "config.json", "config")
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    table, problems = output_table(out)
    recorded = prov["tensors"]
    missing = [n for n in recorded if n not in table]
    extra = [n for n in table if n not in recorded]
    counts = dict.fromkeys(KINDS, 0)
    mismatches = [p for p in problems]
    not_rederived = []
    checker = Checker(out, prov, models, via, aligned, vocab if isinstance(vocab, int) else None)
    present = sorted((n for n in recorded if n in table), key=lambda n: (str(table[n].file), table[n].offset))
    try:
        for name in present:
            kind, problem, note = checker.check(name, recorded[name], table[name])
            if problem:
                mismatches.append({"tensor": name, "check": recorded[name].get("status") or recorded[name]["op"],
                                   "detail": problem})
            else:
                counts[kind] += 1
                if note:
                    not_rederived.append({"tensor": name, "reason": note})
            if progress:
                progress(table[name].nbytes)
    finally:
        checker.files.close()
        if checker.sources is not None:
            checker.sources.close()
    return {
        "in_output": len(table),
        "in_provenance": len(recorded),
        "checked": len(present),
        "copied_equal": counts["copied"],
        "converted_equal": counts["converted"],
        "zeroed": counts["zeroed"],
        "scaled": counts["scaled"],
        "not_rederived": counts["not_rederived"],
        "mismatches": len(mismatches),
        "missing": missing,
        "extra": extra,
        "mismatch_list": mismatches,
        "not_rederived_list": not_rederived,
        "via": DTYPE_NAME.get(via) if via else None,
    }, table


# ------------------------------------------------------------------------------------------------------ logits


LOGITS_DTYPES = ("float32", "bfloat16", "float16")


def _model_logits(path: Path, ids: list[int], device: str, dtype: str = "float32"):
    import torch
    import transformers

    level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), attn_implementation="eager").to(device).eval()
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids], device=device)).logits.to("cpu", torch.float32)
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_logits(out: Path, base: SourceModel, tokens: int, device: str, exact_expected: bool,
                 dtype: str = "float32") -> dict[str, Any]:
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise SourceError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"--device {device}: torch sees no CUDA device here: use --device cpu")
    config = _load_json(out / "config.json", "config")
    vocab = config.get("vocab_size") or base.config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise SourceError(f"{out / 'config.json'}: no vocab_size to draw probe tokens from: use --skip-logits")
    ids = probe_ids(tokens, vocab)
    result: dict[str, Any] = {"tokens": ids, "device": device, "dtype": dtype, "base": str(base.path)}
    try:
        before = _model_logits(base.path, ids, device, dtype)
        after = _model_logits(out, ids, device, dtype)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; said in one line
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        return {**result, "result": "error", "ok": False, "detail": f"transformers could not run it: {first}"}
    if before.shape != after.shape:
        return {**result, "result": "differ", "ok": False,
                "detail": f"logits shapes differ: {list(before.shape)} vs {list(after.shape)}"}
    same = torch.equal(before, after)
    diff = float((before - after).abs().max()) if not same else 0.0
    out_res = {**result, "result": "identical" if same else "differ", "max_abs_diff": diff}
    if same:
        return {**out_res, "ok": True}
    if not exact_expected:
        return {**out_res, "ok": True, "detail": "not expected to be bit-identical: tensors were converted or scaled"}
    return {**out_res, "ok": False}


# ------------------------------------------------------------------------------------------------------ report


def verify(out: str | Path, *, models: Mapping[str, str] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
           device: str = "cpu", skip_logits: bool = False, hub: Any = None, progress=None,
           dtype: str = "float32") -> dict[str, Any]:
    """Check the composed folder `out` against its provenance; the report (see render_verify). Raises a
    ComposerError where it cannot verify at all."""
    out = Path(out).resolve()
    prov = read_provenance(out)
    sources = open_provenance_sources(prov, out, models, hub)
    tensors, _ = check_tensors(out, prov, sources, progress)
    new_layers = list(prov.get("new_layers") or [])
    statuses = {t.get("status") for t in prov["tensors"].values()}
    logits: dict[str, Any]
    if not new_layers:
        logits = {"result": "not applicable", "ok": True, "detail": "no new layers"}
    elif skip_logits:
        logits = {"result": "skipped", "ok": True, "detail": "--skip-logits"}
    elif tensors["missing"]:
        logits = {"result": "skipped", "ok": True, "detail": "tensors are missing"}
    else:
        base = sources[prov["base_model"]]
        logits = check_logits(out, base, max_tokens, device, exact_expected=statuses <= {"copied", "zeroed"},
                              dtype=dtype)
    ok = not tensors["mismatches"] and not tensors["missing"] and not tensors["extra"] and logits["ok"]
    return {"output": str(out), "operation": prov.get("operation"), "base_model": prov.get("base_model"),
            "new_layers": new_layers, "ok": ok, "tensors": tensors, "logits": logits}


def _listed(title: str, rows: list[str]) -> list[str]:
    lines = [f"  {title}:"] + [f"    {r}" for r in rows[:SHOWN]]
    if len(rows) > SHOWN:
        lines.append(f"    ... and {len(rows) - SHOWN} more (--json lists all)")
    return lines


def render_verify(r: Mapping[str, Any]) -> str:
    t, lg = r["tensors"], r["logits"]
    via = f", through {t['via']}" if t["via"] else ""
    lines = [
        f"output:      {r['output']}",
        f"operation:   {r['operation']} of {r['base_model']}"
        + (f" (new layers {', '.join(map(str, r['new_layers']))})" if r["new_layers"] else ""),
        f"tensors:     {t['checked']} checked ({t['in_output']} in the shards, {t['in_provenance']} in the provenance)",
        f"  copied:         {t['copied_equal']} equal to their sources bit for bit",
        f"  converted:      {t['converted_equal']} equal to their sources after the recorded dtype conversion{via}",
        f"  zeroed:         {t['zeroed']} exactly zero",
        f"  scaled:         {t['scaled']} equal to source x scale, as composer computes it",
        f"  not re-derived: {t['not_rederived']}"
        + (f" ({t['not_rederived_list'][0]['reason']})" if t["not_rederived_list"] else ""),
        f"  mismatches:     {t['mismatches']}, missing: {len(t['missing'])}, extra: {len(t['extra'])}",
    ]
    if t["mismatch_list"]:
        lines += _listed("mismatched", [f"{m['tensor']}: {m['detail']}" for m in t["mismatch_list"]])
    if t["missing"]:
        lines += _listed("missing (in the provenance, not in the shards)", t["missing"])
    if t["extra"]:
        lines += _listed("extra (in the shards, not in the provenance)", t["extra"])
    if lg["result"] in ("identical", "differ") and "tokens" in lg:
        how = f"on {len(lg['tokens'])} probe tokens, {lg.get('dtype', 'float32')} on {lg['device']}, base vs output"
        text = "identical (torch.equal) " + how if lg["result"] == "identical" else (
            f"DIFFER {how} (max |diff| {lg.get('max_abs_diff', float('nan')):.3g})")
        if lg.get("detail"):
            text += f": {lg['detail']}"
    else:
        text = lg["result"] + (f" ({lg['detail']})" if lg.get("detail") else "")
    lines.append(f"logits:      {text}")
    if r["ok"]:
        lines.append("result:      OK" + (" (some tensors not re-derived: see above)" if t["not_rederived"] else ""))
    else:
        why = [f"{t['mismatches']} mismatched" if t["mismatches"] else "",
               f"{len(t['missing'])} missing" if t["missing"] else "",
               f"{len(t['extra'])} extra" if t["extra"] else "",
               "logits differ" if lg["result"] == "differ" and not lg["ok"] else "",
               "logits check failed" if lg["result"] == "error" else ""]
        lines.append(f"result:      FAILED ({', '.join(w for w in why if w)})")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--max-tokens", default=DEFAULT_MAX_TOKENS, show_default=True, type=click.IntRange(1, 4096),
              help="Length of the logits probe (fixed token ids).")
@click.option("--device", default="cpu", show_default=True, help="Torch device of the logits check (cpu, cuda, ...).")
@click.option("--skip-logits", is_flag=True, help="Check the tensors only, not the logits of a block expansion.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(LOGITS_DTYPES),
              help="Dtype of the logits check: bfloat16 halves its memory (a 7B fits 24 GB); the zeroed blocks add "
                   "exact zeros in any dtype, so the logits must still be bit-identical.")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH",
              help="Find model NAME of the provenance in folder PATH (repeatable), as compose --model does.")
def verify_command(out: Path, as_json: bool, max_tokens: int, device: str, skip_logits: bool, dtype: str,
                   models: tuple[str, ...]) -> None:
    """Check the folder OUT that compose wrote against its sources, as composer_provenance.json records them: every
    copied tensor bit for bit (after the recorded dtype conversion), zeroed ones exactly zero, scaled ones equal to
    source x scale, merged ones for shape, dtype and finite values; no tensor missing or extra. For a block
    expansion, the logits of a fixed probe must equal the base model's (torch.equal, float32), which loads the base
    and then the output (memory: about 4 bytes per parameter of the larger). Exit status: 0 verified, 1 a
    mismatch, 2 could not verify."""
    from composer.cli import _parse_models  # cli imports this module: here, not at the top

    overrides = _parse_models(models)
    try:
        from tqdm import tqdm

        with tqdm(unit="B", unit_scale=True, desc="verifying", file=sys.stderr, disable=None, leave=False) as bar:
            report = verify(out, models=overrides, max_tokens=max_tokens, device=device, skip_logits=skip_logits,
                            progress=bar.update, dtype=dtype)
    except ComposerError as exc:
        error = click.ClickException(str(exc))
        error.exit_code = EXIT_ERROR
        raise error from None
    click.echo(json.dumps(report, indent=2) if as_json else render_verify(report))
    if not report["ok"]:
        sys.exit(EXIT_FAILED)
