"""Build a recipe into a Plan: every output tensor's op, sources, parameters and dtype, from headers alone."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from composer import architectures
from composer.architectures import LAYER_NAME, PER_LAYER_KEYS
from composer.depth import LayerSource, compile_layers
from composer.dtypes import DTYPE_NAME, FLOAT_DTYPES, ST_DTYPE
from composer.errors import PlanError, SourceError
from composer.params import resolve_parameter
from composer.recipe import DTYPES, Recipe
from composer.recipe_errors import suggest
from composer.sources import SourceModel, TensorInfo
from composer.tensorplan import DEFAULT_SHARD_SIZE, LayerPlan, Plan, TensorPlan
from composer.tokenizer import build_output_tokenizer, check_vocabulary, tokenizer_files
from composer.lora import describe as describe_adapter
from composer.vocab import align, is_vocabulary_tensor
from composer.writer import layout_shards

# Architecture facts (layer names, depth key, embeddings, the tensors zeroed in block expansion): composer.architectures
def _layer_table(model: SourceModel) -> tuple[str, dict[int, dict[str, TensorInfo]], dict[str, TensorInfo]]:
    """Split a model's tensors into (layer prefix, {layer: {suffix: info}}, {non-layer name: info})."""
    prefixes, layers, other = set(), {}, {}
    for name, info in model.tensors.items():
        m = LAYER_NAME.match(name)
        if m:
            prefixes.add(m["prefix"])
            layers.setdefault(int(m["layer"]), {})[m["rest"]] = info
        else:
            other[name] = info
    if len(prefixes) > 1:
        known = architectures.modules(model.config)
        raise PlanError(
            f"model '{model.name}' has layers under several prefixes ({', '.join(sorted(prefixes))}): "
            + (f"write the recipe with modules: ({', '.join(known)})" if known else
               f"multi-module models of model_type {model.config.get('model_type')} are not supported yet")
        )
    if not prefixes:
        raise PlanError(f"model '{model.name}' has no decoder layers (no tensor named like '<prefix>.N.*')")
    n = model.num_layers
    if sorted(layers) != list(range(n)):
        raise PlanError(
            f"model '{model.name}': config.json says {architectures.depth_key(model.config)}={n} but its weights "
            f"hold layers "
            f"{min(layers)}..{max(layers)} ({len(layers)} layers)"
        )
    return prefixes.pop(), layers, other


def _check_same_shape(info: TensorInfo, expected: TensorInfo, model: str, out_name: str) -> None:
    if info.shape != expected.shape:
        if is_vocabulary_tensor(out_name) and info.shape[1:] == expected.shape[1:]:
            raise PlanError(
                f"'{model}' has {info.shape[0]} vocabulary rows in '{info.name}' but the base model has "
                f"{expected.shape[0]}: set tokenizer_source: base (or the name of the model whose tokenizer the "
                "output should use) to align the embeddings by token"
            )
        raise PlanError(
            f"shape mismatch: '{model}' tensor '{info.name}' is {list(info.shape)} but output tensor '{out_name}' "
            f"needs {list(expected.shape)} (from the base model): the models do not share an architecture"
        )


def _dtypes(recipe: Recipe, info: TensorInfo) -> tuple[str | None, str]:
    """(the dtype values round through, the output dtype) for one source tensor."""
    via = ST_DTYPE[DTYPES[recipe.dtype]] if recipe.dtype else None
    out = ST_DTYPE[DTYPES[recipe.out_dtype]] if recipe.out_dtype else (via or info.dtype)
    return (None, info.dtype) if info.dtype not in FLOAT_DTYPES else (via, out)


def _passthrough(recipe: Recipe, out_name: str, layer: LayerSource, info: TensorInfo, *, zero: bool,
                 where: dict[str, Any]) -> TensorPlan:
    via, out = _dtypes(recipe, info)
    common = dict(name=out_name, inputs=(info,), models=(layer.model,), dtype=out, via=via, **where)
    if zero:
        return TensorPlan(op="zeros", **common)
    scale = resolve_parameter("scale", layer.inputs[0].scopes, info.name, layer.t)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise PlanError(f"parameter scale for '{info.name}' is {scale!r}: it must be a number")
        if scale != 1:
            if info.dtype not in FLOAT_DTYPES:
                raise PlanError(f"cannot scale '{info.name}' of '{layer.model}': its dtype {info.dtype} is not a float")
            return TensorPlan(op="scale", params=(("scale", float(scale)),), **common)
    return TensorPlan(op="copy", **common)


def _resolve(method, params, scopes: tuple, tensor: str, t: float, model: str | None = None) -> dict[str, Any]:
    """Each parameter's value for one tensor, checked against its type and range."""
    values = {}
    for p in params:
        value = resolve_parameter(p.name, scopes, tensor, t, None if p.required else p.default)
        if value is None:
            raise PlanError(f"merge_method {method.name} needs parameter '{p.name}' for tensor '{tensor}': set it "
                            "under parameters (globally, per slice or per model)")
        problem = p.type_error(value)
        if problem:
            raise PlanError(f"parameter {p.name} for '{tensor}' is {value!r}: {problem}")
        if p.kind != "bool" and not p.in_range(value):
            who = f" of model '{model}'" if model else ""
            raise PlanError(f"{method.name}: {p.name} {value:g}{who} for '{tensor}' is outside {p.range_text}"
                            f"{' (' + p.why + ')' if p.why else ''}: use a value in {p.range_text}")
        values[p.name] = value
    return values


def _merge(recipe: Recipe, out_name: str, layer: LayerSource, infos: list[TensorInfo], where: dict) -> TensorPlan:
    """A merged tensor: inputs in recipe order, parameters resolved as mergekit resolves them (shared ones on the
    output name over slice and global scopes; per-input ones on each input's own name, source scope first), then
    the method's contract and checks."""
    from composer.methods import METHODS, MergeJob

    method = METHODS[recipe.merge_method]
    models = [i.model for i in layer.inputs]
    base = layer.base if layer.base in models else None
    if method.needs_base and layer.base is not None and base is None:
        raise PlanError(f"merge_method {method.name}: base_model '{layer.base}' is not among the sources of the slice "
                        f"that makes '{out_name}': add it as a source")
    if method.needs_base and base is None:
        raise PlanError(f"merge_method {method.name} needs a base model: set base_model")
    base_index = models.index(base) if base is not None else None
    takes_base = method.base == "ignored"
    shared = _resolve(method, [p for p in method.params if not p.per_input], layer.shared_scopes, out_name, layer.t)
    per_input = []
    for k, (inp, info) in enumerate(zip(layer.inputs, infos)):
        takes = [p for p in method.params if p.per_input] if (k != base_index or takes_base) else []
        per_input.append(tuple(_resolve(method, takes, inp.scopes, info.name, layer.t, inp.model).items()))
    n_other = len(infos) - (base_index is not None and not takes_base)
    counts = (f"{method.min_inputs}" + ("+" if method.max_inputs is None else
                                        f"-{method.max_inputs}" if method.max_inputs != method.min_inputs else ""))
    if len(infos) < method.min_inputs or method.max_inputs is not None and len(infos) > method.max_inputs:
        raise PlanError(f"merge_method {method.name} takes {counts} models (base included), got {len(infos)}")
    if n_other < method.min_others or method.max_others is not None and n_other > method.max_others:
        want = (f"{method.min_others}" if method.max_others == method.min_others else f"at least {method.min_others}"
                if method.max_others is None else f"{method.min_others}-{method.max_others}")
        raise PlanError(f"merge_method {method.name} takes {want} models besides the base, got {n_other}")
    via, out = _dtypes(recipe, infos[0])
    t = TensorPlan(name=out_name, op=method.name, inputs=tuple(infos), models=tuple(models), dtype=out, via=via,
                   params=tuple(shared.items()), input_params=tuple(per_input), base=base_index, **where)
    problem = method.check(MergeJob.of(t, method)) if method.check else None
    if problem:
        raise PlanError(f"{method.name} at '{out_name}': {problem}")
    return t


def _operation(recipe: Recipe, layers: list[LayerSource], tensors: list[TensorPlan], sources) -> str:
    if recipe.merge_method not in (None, "passthrough"):
        return recipe.merge_method
    if recipe.block_expansion is not None:
        return "block-expansion"
    if recipe.interleave is not None:
        return "interleave"
    zeroed = {t.layer for t in tensors if t.status == "zeroed" and t.layer is not None}
    if zeroed:
        return "block-expansion"
    models = {layer.model for layer in layers}
    if len(models) == 1 and len(layers) > sources[next(iter(models))].num_layers:
        return "depth-upscaling"
    return "passthrough"


def _output_config(base: SourceModel, layers: list[LayerSource], sources, out_dtype: str | None) -> dict[str, Any]:
    config = dict(base.config)
    config[architectures.depth_key(base.config) or "num_hidden_layers"] = len(layers)
    if "torch_dtype" in config:
        config.setdefault("dtype", config.pop("torch_dtype"))
    if out_dtype:
        config["dtype"] = out_dtype
    for key in PER_LAYER_KEYS:
        if isinstance(config.get(key), list):
            values = []
            for layer in layers:
                src = sources[layer.model].config.get(key)
                if not isinstance(src, list) or len(src) != sources[layer.model].num_layers:
                    raise PlanError(
                        f"config key '{key}' is per-layer in the base model but '{layer.model}' "
                        f"does not have one entry per layer"
                    )
                values.append(src[layer.source_layer])
            config[key] = values
    return config


def _tied_head(model: SourceModel, other: Mapping[str, TensorInfo], name: str) -> TensorInfo | None:
    """A model with tied embeddings stores no LM head: its head is its embedding matrix."""
    if name != "lm_head.weight" or not model.config.get("tie_word_embeddings"):
        return None
    return next((info for n, info in other.items()
                 if n.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight"))),
                None)


def _check_compatible(base: SourceModel, sources: Mapping[str, SourceModel], used: set[str],
                      allow_crimes: bool) -> list[str]:
    """Refuse models of different architectures, unless `allow_crimes` (mergekit's --allow-crimes): then the
    shape checks decide, and the plan notes the mix."""
    arch = base.config.get("architectures")
    mixed = [name for name in sorted(used) if sources[name].config.get("architectures") != arch]
    if mixed and not allow_crimes:
        other = sources[mixed[0]].config.get("architectures")
        raise PlanError(f"models have different architectures: '{base.name}' is {arch}, '{mixed[0]}' is {other}: "
                        "use models of one architecture, or pass --allow-crimes to combine them wherever their tensor "
                        f"names and shapes agree (config.json then comes from '{base.name}', as in mergekit)")
    return [f"architectures mixed (--allow-crimes): {', '.join(mixed)} with '{base.name}' ({arch}), whose "
            "config.json the output takes"] if mixed else []


def _tokenizer_model(recipe: Recipe, base: str) -> str:
    ts = recipe.vocabulary_source
    return base if ts in (None, "base", "union") else ts


def _module_view(model: SourceModel, spec: architectures.ModuleSpec, module: str) -> SourceModel:
    """A model as one of its modules: the tensors under the module's prefix (named without it), its sub-config."""
    config = model.config.get(spec.config) if spec.config else None
    if spec.config and not isinstance(config, Mapping):
        raise PlanError(f"model '{model.name}' has no '{spec.config}' in config.json, which describes its module "
                        f"'{module}': it is not a {model.config.get('model_type')} checkpoint")
    tensors = {n[len(spec.prefix):]: info for n, info in model.tensors.items() if n.startswith(spec.prefix)}
    if not tensors:
        raise PlanError(f"model '{model.name}' has no tensors under '{spec.prefix}' (module '{module}')")
    return replace(model, config=dict(config or {}), tensors=tensors)


def _build_modular(recipe: Recipe, sources: Mapping[str, SourceModel], shard_size: int, recipe_text: str,
                   recipe_path: str, seed: int, allow_crimes: bool) -> Plan:
    """mergekit's `modules:`: each named module planned as a recipe of its own over the models' module tensors
    (renamed back under the module's prefix), its sub-config updated; every other tensor copied from the base."""
    base = sources[recipe.base_model]
    specs = architectures.modules(base.config)
    if specs is None:
        known = ", ".join(sorted(architectures.MULTIMODAL))
        raise PlanError(f"'{base.name}' (model_type {base.config.get('model_type')}) has no modules composer knows "
                        f"(it knows those of: {known}): write its recipe with slices or models")
    config = dict(base.config)
    tensors: list[TensorPlan] = []
    layers: tuple[LayerPlan, ...] = ()
    notes: list[str] = []
    for name in recipe.modules:
        spec = specs.get(name)
        if spec is None:
            raise PlanError(f"'{base.name}' has no module '{name}'{suggest(name, list(specs))} (its modules: "
                            f"{', '.join(specs)})")
        sub = recipe.module(name)
        views = {m: _module_view(sources[m], spec, name) for m in sub.referenced_models()}
        plan = build_plan(sub, views, shard_size=shard_size, seed=seed, allow_crimes=allow_crimes)
        tensors += [replace(t, name=spec.prefix + t.name) for t in plan.tensors]
        if spec.config:
            config[spec.config] = {k: v for k, v in plan.config.items()
                                   if k in base.config[spec.config] or k == architectures.depth_key(plan.config)}
        if spec.config == "text_config" or not layers:
            layers = plan.layers
        notes += [f"{name}: {note}" for note in plan.notes]
    covered = tuple(specs[n].prefix for n in recipe.modules)
    for name, info in base.tensors.items():  # outside the recipe's modules: the base's, as they are
        if not name.startswith(covered):
            via, out = _dtypes(recipe, info)
            tensors.append(TensorPlan(name=name, op="copy", inputs=(info,), models=(base.name,), dtype=out, via=via))
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    if "torch_dtype" in config:
        config.setdefault("dtype", config.pop("torch_dtype"))
    if out_dtype:
        config["dtype"] = out_dtype
    notes.insert(0, f"modules: {', '.join(recipe.modules)} from the recipe; the rest copied from '{base.name}'")
    return Plan(recipe=recipe, operation="modules", base=base.name,
                tokenizer_from=_tokenizer_model(recipe, base.name), sources=sources, tensors=tuple(tensors),
                layers=layers, config=config, shards=layout_shards(tensors, shard_size), recipe_text=recipe_text,
                recipe_path=recipe_path, notes=tuple(notes), seed=seed)


def build_plan(
    recipe: Recipe, sources: Mapping[str, SourceModel], *, shard_size: int = DEFAULT_SHARD_SIZE,
    recipe_text: str = "", recipe_path: str = "", seed: int = 0, allow_crimes: bool = False,
) -> Plan:
    """Every check that can run before the first byte is written runs here. `allow_crimes` lets models of
    different architectures combine where their tensors agree (mergekit's --allow-crimes)."""
    if recipe.form == "moe":  # a mergekit-moe config (composer.moe)
        from composer.moe import build_moe_plan

        return build_moe_plan(recipe, sources, shard_size=shard_size, recipe_text=recipe_text,
                              recipe_path=recipe_path, seed=seed)
    missing = [m for m in recipe.referenced_models() if m not in sources]
    if missing:
        raise SourceError(f"model '{missing[0]}' was not resolved")
    if recipe.modules is not None:
        return _build_modular(recipe, sources, shard_size, recipe_text, recipe_path, seed, allow_crimes)
    layers, pre, post = compile_layers(recipe, sources)
    base_name = recipe.base_model or pre.model
    base = sources[base_name]
    used = {i.model for la in (*layers, pre, post) for i in la.inputs}
    crimes = _check_compatible(base, sources, used, allow_crimes)
    if recipe.block_expansion is not None:
        refusal = architectures.expansion_refusal(base.config)
        if refusal:
            raise PlanError(refusal)
    prefix, base_layers, base_other = _layer_table(base)
    tables = {name: _layer_table(sources[name]) for name in used}
    mismatch = architectures.kind_mismatch(base.config, len(layers), [
        [(i.model, sources[i.model].config, sources[i.model].num_layers, i.source_layer) for i in la.inputs]
        for la in layers])
    if mismatch:
        raise PlanError(mismatch)
    row = architectures.family(base.config)
    kinds = row.kinds(base.config, len(layers)) if row and row.kinds else [""] * len(layers)
    base_kinds = row.kinds(base.config, base.num_layers) if row and row.kinds else [""] * base.num_layers
    templates = {k: base_layers[base_kinds.index(k)] for k in set(base_kinds)}
    templates.update({k: tables[la.inputs[0].model][1][la.inputs[0].source_layer]  # a kind the base lacks
                      for k, la in zip(kinds, layers) if k not in templates})
    merging = recipe.merge_method not in (None, "passthrough")

    def make(out_name: str, src: LayerSource, infos: list[TensorInfo], zero: bool, **where) -> TensorPlan:
        for inp, info in zip(src.inputs, infos):
            _check_same_shape(info, infos[0], inp.model, out_name)
        if merging:
            return _merge(recipe, out_name, src, infos, where)
        return _passthrough(recipe, out_name, src, infos[0], zero=zero, where=where)

    tok = _tokenizer_model(recipe, base_name)
    out_tokenizer = build_output_tokenizer(recipe, sources, base_name)

    def edge_tensors(names: list[str], edge: LayerSource) -> list[TensorPlan]:
        models = [inp.model for inp in edge.inputs]
        alignment = None
        if recipe.vocabulary_source is not None and any(is_vocabulary_tensor(n) for n in names):
            alignment = align(out_tokenizer, recipe, [sources[m] for m in dict.fromkeys(models)])
        made = []
        for name in names:
            infos = []
            for inp in edge.inputs:
                other = tables[inp.model][2]
                info = other.get(name) or _tied_head(sources[inp.model], other, name)
                if info is None:
                    raise SourceError(f"model '{inp.model}' has no tensor '{name}' (the base model '{base_name}' has it)")
                if alignment is None or not is_vocabulary_tensor(name):
                    _check_same_shape(info, base_other[name], inp.model, name)
                elif info.shape[1:] != base_other[name].shape[1:]:
                    _check_same_shape(info, base_other[name], inp.model, name)
                infos.append(info)
            if alignment is not None and is_vocabulary_tensor(name):
                infos = alignment.inputs(models, infos, recipe.base_model)
                aligned.append(alignment.size)
            made.append(make(name, edge, infos, False))
        return made

    aligned: list[int] = []

    pre_names = [n for n in base_other if architectures.is_embedding(base.config, n)]
    tensors: list[TensorPlan] = edge_tensors(pre_names, pre)
    layer_plans: list[LayerPlan] = []
    for out_idx, layer in enumerate(layers):
        per_input = []
        template = templates[kinds[out_idx]]  # the base's first layer of this kind (hybrids' layers differ by kind)
        for inp in layer.inputs:
            suffixes = tables[inp.model][1][inp.source_layer]
            # --allow-crimes: the base's tensors are the output's, as in mergekit; another model's extras go unread
            if set(suffixes) != set(template) and not (allow_crimes and set(template) <= set(suffixes)):
                diff = sorted(set(suffixes) ^ set(template))
                raise PlanError(
                    f"'{inp.model}' layer {inp.source_layer} does not have the base model's tensors "
                    f"(differs in: {', '.join(diff[:3])}): the models do not share an architecture"
                )
            per_input.append(suffixes)
        if layer.expanded and row is not None and not all(
                any(architectures.under(z, s) for s in per_input[0]) for z in row.zeroed):
            raise PlanError(
                f"block expansion needs {' and '.join(row.zeroed)} in every layer; "
                f"'{layer.model}' layer {layer.source_layer} lacks one"
            )
        made = []
        for suffix in template:
            out_name = f"{prefix}.{out_idx}.{suffix}"
            infos = [suffixes[suffix] for suffixes in per_input]
            for inp, info in zip(layer.inputs, infos):
                _check_same_shape(info, template[suffix], inp.model, out_name)
            zero = layer.expanded and architectures.zeroed(base.config, suffix)
            made.append(make(out_name, layer, infos, zero, layer=out_idx, source_layer=layer.source_layer))
        tensors += made
        zeroed = tuple(t.name.rsplit(f".{out_idx}.", 1)[1] for t in made if t.status == "zeroed")
        status = ("merged" if merging else "new" if zeroed else
                  "scaled" if any(t.op == "scale" for t in made) else "copied")
        names = tuple((i.model, i.source_layer) for i in layer.inputs)
        layer_plans.append(LayerPlan(out_idx, " + ".join(m for m, _ in names), layer.source_layer, status, zeroed,
                                     names))
    tensors += edge_tensors([n for n in base_other if n not in pre_names], post)


    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    config = _output_config(base, layers, sources, out_dtype)
    if out_dtype is None and "dtype" not in config and tensors:
        config["dtype"] = DTYPE_NAME.get(tensors[0].dtype, "float32")
    notes = crimes + [describe_adapter(n, sources[n].adapted) for n in recipe.referenced_models()
                      if sources[n].adapted]
    if out_tokenizer is not None and recipe.vocabulary_source is not None:
        spec = recipe.tokenizer
        pad = spec.pad_to_multiple_of if spec is not None else None
        size = len(out_tokenizer.vocab)
        config["vocab_size"] = -(-size // pad) * pad if pad else size
        if aligned:
            padded = f", padded to {config['vocab_size']} rows" if config["vocab_size"] != size else ""
            notes.append(f"embeddings aligned to {out_tokenizer.description} vocabulary ({size} tokens{padded}) by "
                         "token string")
    if out_tokenizer is not None:
        notes += out_tokenizer.notes
        if out_tokenizer.template:
            notes.append(f"chat template: {out_tokenizer.template}")
    if recipe.vocabulary_source is None:
        for inp in pre.inputs:
            check_vocabulary(sources[tok], sources[inp.model])
    if merging:
        from composer.methods import METHODS

        method = METHODS[recipe.merge_method]
        scopes = [recipe.parameters, *(m.parameters for m in recipe.models or []),
                  *(sc for sl in recipe.slices or [] for sc in (sl.parameters, *(x.parameters for x in sl.sources)))]
        for p in method.params:
            if p.unused and any(p.name in (sc or {}) for sc in scopes):
                notes.append(f"{method.name} ignores '{p.name}', as mergekit 0.1.5 does: {method.notes}")
    if sources[tok].path is not None and not tokenizer_files(sources[tok].path):
        notes.append(f"'{tok}' has no tokenizer files: the output will have none")
    return Plan(
        recipe=recipe, operation=_operation(recipe, layers, tensors, sources), base=base_name, tokenizer_from=tok,
        tokenizer=out_tokenizer, sources=sources, tensors=tuple(tensors), layers=tuple(layer_plans), config=config,
        shards=layout_shards(tensors, shard_size), recipe_text=recipe_text, recipe_path=recipe_path,
        notes=tuple(notes), seed=seed,
    )
