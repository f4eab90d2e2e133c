"""What a plan says, for people (`--dry-run`), programs (`--json`) and trainers (the provenance file)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from composer.dtypes import DTYPE_NAME
from composer.sources import HubOrigin, free_bytes
from composer.tensorplan import CHUNK_BYTES, SPARE_CHUNKS, WORKERS, Plan, merge_mode

BASE_MEMORY = 60 * 2**20  # the interpreter with composer loaded
TORCH_MEMORY = 250 * 2**20  # torch's own footprint once a tensor has to be computed, not copied


def layer_runs(plan: Plan) -> list[dict[str, Any]]:
    """The layer map in runs: consecutive output layers from consecutive layers of one model, same status."""
    runs: list[dict[str, Any]] = []
    for layer in plan.layers:
        last = runs[-1] if runs else None
        if (
            last and last["model"] == layer.model and last["status"] == layer.status
            and last["zeroed"] == list(layer.zeroed) and last["source"][1] + 1 == layer.source_layer
            and layer.status != "new"
        ):
            last["out"][1] = layer.index
            last["source"][1] = layer.source_layer
        else:
            runs.append({"out": [layer.index, layer.index], "model": layer.model,
                         "source": [layer.source_layer, layer.source_layer], "status": layer.status,
                         "zeroed": list(layer.zeroed)})
    return runs


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def merge_parameters(plan: Plan) -> list[dict[str, Any]]:
    """Per output layer, the parameters each group of its merged tensors resolved to (what `t` layer 17's
    attention gets): [{"layer": 17, "groups": [{"modules": ["self_attn"], "params": "t=0.42"}, ...]}]."""
    rows: dict[Any, dict[str, list[str]]] = {}
    for t in plan.tensors:
        if not t.is_merge:
            continue
        shared = [f"{k}={_fmt(v)}" for k, v in t.params]
        per = {}
        for params in t.input_params:
            for k, v in params:
                per.setdefault(k, []).append(_fmt(v))
        text = ", ".join(shared + [f"{k}=[{', '.join(v)}]" for k, v in per.items()]) or "defaults"
        module = t.name.split(f".{t.layer}.", 1)[1].split(".")[0] if t.layer is not None else t.name
        key = t.layer if t.layer is not None else ("edge", t.name)
        groups = rows.setdefault(key, {})
        if module not in groups.setdefault(text, []):
            groups[text].append(module)
    return [{"layer": key if isinstance(key, int) else key[1],
             "groups": [{"params": text, "modules": mods} for text, mods in groups.items()]}
            for key, groups in rows.items()]


def peak_memory_estimate(plan: Plan, workers: int = WORKERS) -> int:
    """Interpreter + the aligned output chunks (one per worker, and spares that are written while the workers fill
    others) + torch and its scratch when a tensor is computed + the buffer merged tensors' inputs are staged in
    (composer.staging)."""
    from composer.staging import buffer_bytes

    chunks = (workers + SPARE_CHUNKS) * CHUNK_BYTES
    return BASE_MEMORY + chunks + (TORCH_MEMORY + workers * plan.compute_memory if plan.computes else 0) + \
        buffer_bytes(plan)


def used_models(plan: Plan) -> list[str]:
    """The models the output is made from, base first."""
    return list(dict.fromkeys([plan.base, *(m for la in plan.layers for m, _ in la.sources)]))


def hub_bases(plan: Plan) -> list[HubOrigin]:
    """The Hub models the output derives from, base first, each (id, commit) once: the used models fetched from
    the Hub or named by Hub id, and the Hub models behind an earlier stage's output."""
    found: dict[tuple[str, str | None], HubOrigin] = {}
    for name in used_models(plan):
        src = plan.sources[name]
        for origin in ((src.hub,) if src.hub else ()) + tuple(src.lineage):
            found.setdefault((origin.repo_id, origin.commit), origin)
    return list(found.values())


def source_list(plan: Plan) -> list[dict[str, Any]]:
    """Per model the recipe names: its Hub id and exact commit (None for local folders)."""
    return [{"name": name, "hub_id": src.hub.repo_id if src.hub else None,
             "revision": src.hub.revision if src.hub else None, "commit": src.hub.commit if src.hub else None}
            for name, src in plan.sources.items()]


def summary(plan: Plan, out: str | Path | None = None, workers: int = WORKERS) -> dict[str, Any]:
    used = dict.fromkeys(m for la in plan.layers for m, _ in la.sources)
    source_layers = {name: plan.sources[name].num_layers for name in used}
    dtypes = sorted({DTYPE_NAME.get(t.dtype, t.dtype) for t in plan.tensors})
    result: dict[str, Any] = {
        "recipe": plan.recipe_path,
        "operation": plan.operation,
        "base_model": plan.base,
        "tokenizer_from": plan.tokenizer_from,
        "sources": source_list(plan),
        "source_layers": source_layers,
        "layers": len(plan.layers),
        "layer_map": layer_runs(plan),
        "new_layers": [la.index for la in plan.layers if la.status == "new"],
        "tensors": len(plan.tensors),
        "parameters": plan.num_parameters,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "output_bytes": plan.file_bytes,
        "shards": [{"file": s.file, "bytes": s.size, "tensors": len(s.entries)} for s in plan.shards],
        "peak_memory_bytes": peak_memory_estimate(plan, workers),
        "merged": any(t.is_merge for t in plan.tensors),
        "whole_tensors": any(t.is_merge and merge_mode(t) == "whole" for t in plan.tensors),
        "merge_parameters": merge_parameters(plan),
        "notes": list(plan.notes),
        "remote_code": _remote_code(plan),
    }
    new = result["new_layers"]
    if new:  # a block expansion: how to train exactly its new blocks
        from composer.training import llama_factory_fit, training_advice

        settings, why = llama_factory_fit(new, len(plan.layers), [t.name for t in plan.tensors])
        result["training"] = {"new_layers": new, "llama_factory": settings, "llama_factory_mismatch": why or None,
                              "advice": training_advice(new, len(plan.layers), [t.name for t in plan.tensors],
                                                        str(out) if out is not None else "OUT")}
    if out is not None:
        free = free_bytes(Path(out))
        result["destination"] = {"path": str(Path(out).resolve()), "free_bytes": free,
                                 "enough_space": free >= plan.file_bytes}
    return result


def _remote_code(plan: Plan) -> dict[str, Any] | None:
    from composer.remote_code import describe, remote_code

    code = remote_code(plan)
    if code is None:
        return None
    return {"trust_remote_code": True, "model": code.model, "files": [f.name for f in code.files],
            "missing": list(code.missing), "elsewhere": list(code.elsewhere), "text": describe(code)}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def render(s: dict[str, Any]) -> str:
    counts = ", ".join(f"{m} ({n})" for m, n in s["source_layers"].items())
    lines = [
        f"recipe:      {s['recipe'] or '-'}",
        f"operation:   {s['operation']}",
        f"base model:  {s['base_model']}   tokenizer from: {s['tokenizer_from']}",
        *(f"hub model:   {h['name']} at commit {h['commit'] or 'unknown (a local copy named by Hub id)'}"
          for h in s.get("sources", ()) if h["hub_id"]),
        f"layers:      {counts} -> {s['layers']}",
        "layer map:   output <- model:layer",
    ]
    width = max(len(_span(*r["out"])) for r in s["layer_map"]) if s["layer_map"] else 1
    for r in s["layer_map"]:
        what = r["status"]
        if r["zeroed"]:
            what += f" ({', '.join(sorted({z.split('.')[-2] for z in r['zeroed']}))} zeroed)"
        lines.append(f"  {_span(*r['out']):>{width}} <- {r['model']}:{_span(*r['source'])}  {what}")
    dtype = s["dtype"] if isinstance(s["dtype"], str) else "/".join(s["dtype"])
    lines += [
        f"tensors:     {s['tensors']:,}",
        f"parameters:  {s['parameters']:,}",
        f"output:      {human_bytes(s['output_bytes'])} in {len(s['shards'])} shard"
        f"{'s' if len(s['shards']) != 1 else ''} ({dtype})",
        f"peak memory: about {human_bytes(s['peak_memory_bytes'])} (estimate; "
        + ("the largest merged tensor is held whole, in float32)" if s.get("whole_tensors")
           else "does not grow with model size)"),
    ]
    dest = s.get("destination")
    if dest:
        verdict = "ok" if dest["enough_space"] else "NOT ENOUGH"
        lines.append(f"free space:  {human_bytes(dest['free_bytes'])} at {dest['path']} ({verdict})")
    if s["merge_parameters"]:
        lines.append("parameters:  output layer (or tensor): resolved values")
        for row in s["merge_parameters"]:
            named = isinstance(row["layer"], int)  # a layer's groups name their modules; an edge tensor is one
            groups = "; ".join(g["params"] + (f" ({', '.join(g['modules'])})" if named else "") for g in row["groups"])
            lines.append(f"  {row['layer']}: {groups}")
    if s.get("remote_code"):
        lines.append(f"remote code: {s['remote_code']['text']}")
    if s.get("training"):
        lines.append(f"training:    {s['training']['advice']}")
    lines += [f"note:        {n}" for n in s["notes"]]
    return "\n".join(lines)


def _tensor_sources(plan: Plan, t) -> list[dict[str, str]]:
    """Each input's model and tensor; for experts stacked into one tensor (composer.moe.Concat), each part's."""
    parts = getattr(t.inputs[0], "parts", None) if len(t.inputs) == 1 else None
    if parts is None:
        return [{"model": m, "tensor": i.name} for m, i in zip(t.models, t.inputs)]
    owners = {id(info): name for name, model in plan.sources.items() for info in model.tensors.values()}
    return [{"model": owners.get(id(p.info), t.models[0]), "tensor": p.info.name} for p in parts]


def _recipe_folder_used(plan: Plan) -> str | None:
    """The recipe file's folder, when some model was found there and not from the current folder: compose verify
    then looks there too. Otherwise nothing is recorded, so the output does not depend on where the recipe lay."""
    if not plan.recipe_path:
        return None
    folder = Path(plan.recipe_path).resolve().parent
    for name, src in plan.sources.items():
        rel = Path(name.split("+", 1)[0])
        if src.path is not None and not rel.is_absolute() and not rel.is_dir() and (folder / rel).is_dir():
            return str(folder)
    return None


def provenance(plan: Plan) -> dict[str, Any]:
    """Where every output tensor came from, and which layers are new: what LLaMA-Pro-style training freezes by."""
    return {
        "format": "composer-provenance/1",
        "operation": plan.operation,
        "base_model": plan.base,
        **({"recipe_folder": folder} if (folder := _recipe_folder_used(plan)) else {}),
        "hub_sources": [o.to_json() for o in hub_bases(plan)],
        "layers": [
            {"layer": la.index, "model": la.model, "source_layer": la.source_layer, "status": la.status,
             "zeroed": list(la.zeroed), "sources": [{"model": m, "layer": i} for m, i in la.sources]}
            for la in plan.layers
        ],
        "new_layers": [la.index for la in plan.layers if la.status == "new"],
        "tensors": {
            t.name: {
                "op": t.op,
                "status": t.status,
                "sources": _tensor_sources(plan, t),
                "dtype": t.dtype,
                **({"params": dict(t.params)} if t.params else {}),
                **({"input_params": [dict(p) for p in t.input_params]} if t.input_params else {}),
                **({"base": t.models[t.base]} if t.base is not None else {}),
                **({"layer": t.layer, "source_layer": t.source_layer} if t.layer is not None else {}),
            }
            for t in plan.tensors
        },
    }
