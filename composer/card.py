"""The model card (README.md): Hub front matter for lineage, then the method, the layer map and the recipe."""
from __future__ import annotations

import yaml

from composer.remote_code import remote_code
from composer.report import hub_bases, layer_runs, used_models
from composer.tensorplan import Plan

METHODS = {
    "depth-upscaling": (
        "depth up-scaling",
        "[SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth Up-Scaling]"
        "(https://arxiv.org/abs/2312.15166)",
    ),
    "block-expansion": (
        "block expansion: each inserted layer copies the one before it with `o_proj` and `down_proj` zeroed, "
        "so the model computes exactly what the original did until the new blocks are trained",
        "[LLaMA Pro: Progressive LLaMA with Block Expansion](https://arxiv.org/abs/2401.02415)",
    ),
    "interleave": (
        "interleaving overlapping windows of layers from several models (passthrough)",
        "[SOLAR 10.7B](https://arxiv.org/abs/2312.15166) for depth up-scaling by layer stacking",
    ),
    "passthrough": ("passthrough: layers stacked as the recipe lists them", ""),
    "moe": ("a mixture of experts built from dense models (mergekit-moe's recipe): attention, norms and embeddings "
            "from the base model, each layer's MLP from every expert, routers initialised from the experts' prompts "
            "(see *Experts*); train it before use, as any merged MoE", ""),
    "modules": ("a multimodal model built module by module (mergekit's `modules:`): each module the recipe names "
                "from its own slices or models, every other tensor (projector, other towers) the base model's; the "
                "layer table below is the text decoder's", ""),
}


def _merge_method(name: str) -> tuple[str, str]:
    from composer.methods import METHODS as MERGES

    method = MERGES[name]
    return (f"the `{name}` merge: {method.summary} (mergekit's semantics, computed in float32)",
            f"[{method.title}]({method.url})")


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def front_matter(plan: Plan) -> dict:
    """The Hub's lineage fields. `base_model` holds plain Hub ids (the Hub accepts nothing else there; the exact
    commits are in the card's Sources section and composer_provenance.json); local folders are never listed.
    `base_model_relation` is `merge` when several models go in, else `finetune`: the Hub's word for weights derived
    from one parent (a depth up-scale or block expansion is trained further, and is neither adapter nor quant)."""
    bases = hub_bases(plan)
    ids = list(dict.fromkeys(o.repo_id for o in bases))
    merged = len(used_models(plan)) > 1 or len(ids) > 1
    front: dict = {}
    if ids:
        front["base_model"] = ids[0] if len(ids) == 1 else ids
        front["base_model_relation"] = "merge" if merged else "finetune"
    base = plan.sources[plan.base]
    origin = base.hub or (base.lineage[0] if base.lineage else None)
    if origin is not None:
        front.update(origin.license)
    front["tags"] = ["composer", *(["merge"] if merged else []), plan.operation,
                     *(["custom_code"] if remote_code(plan) else [])]  # the Hub's tag for trust_remote_code
    front["library_name"] = "transformers"
    return front


def _sources_section(plan: Plan) -> str:
    rows = [f"| `{o.repo_id}` | {o.revision or 'main'} | {f'`{o.commit}`' if o.commit else 'unknown (local copy)'} | "
            f"{'pickle (read with weights_only=True)' if o.pickled else 'safetensors'} |" for o in hub_bases(plan)]
    if not rows:
        return ""
    return ("## Sources\n\n| Hub model | revision | commit | weights |\n|---|---|---|---|\n" + "\n".join(rows)
            + "\n\n")


def _stages_section(plan: Plan) -> str:
    """A multi-document recipe's stages, in order: the earlier ones, then this output."""
    if not plan.stages:
        return ""
    rows = [f"| {i} | `{name}` | {op} |" for i, (name, op) in enumerate(plan.stages, 1)]
    rows.append(f"| {len(plan.stages) + 1} | this model | {plan.operation} |")
    return ("## Stages\n\nBuilt in stages, each from the ones before it (the recipe below holds them all):\n\n"
            "| # | stage | operation |\n|---|---|---|\n" + "\n".join(rows) + "\n\n")


def _experts_section(plan: Plan) -> str:
    recipe = plan.recipe
    if plan.operation != "moe":
        return ""

    def prompts(values) -> str:
        return "; ".join(f"`{p}`" for p in values or []) or "none"

    rows = [f"| {k} | `{e.source_model}` | {prompts(e.positive_prompts)} | {prompts(e.negative_prompts)} |"
            for k, e in enumerate(recipe.experts)]
    rows += [f"| shared | `{e.source_model}` | {prompts(e.positive_prompts)} | {prompts(e.negative_prompts)} |"
             for e in recipe.shared_experts or []]
    return (f"## Experts\n\n{plan.config.get('architectures', ['MoE'])[0]}, {recipe.experts_per_token} experts per "
            f"token, routers from `gate_mode: {recipe.gate_mode}`.\n\n| expert | model | positive prompts | "
            "negative prompts |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n")


def _tokenizer_section(plan: Plan) -> str:
    tok = plan.tokenizer
    if tok is None:
        return ""
    vocab = f"The vocabulary is {tok.description} ({len(tok.vocab)} tokens"
    size = plan.config.get("vocab_size")
    vocab += f", {size} embedding rows)." if isinstance(size, int) and size != len(tok.vocab) else ")."
    template = f" Chat template: {tok.template}." if tok.template else ""
    return f"## Tokenizer\n\n{vocab}{template}\n\n"


def _remote_code_section(plan: Plan) -> str:
    code = remote_code(plan)
    if code is None:
        return ""
    files = ", ".join(f"`{f.name}`" for f in code.files) or "none (see below)"
    missing = (f" The source lacks {', '.join(f'`{m}`' for m in code.missing)}: add them before loading."
               if code.missing else "")
    return ("## Remote code\n\nThis model needs its custom modelling code: load it with `trust_remote_code=True`, "
            f"as its base model `{code.model}` (config.json's `auto_map`). Files copied unchanged from it: "
            f"{files}. composer copied them without running them; read them before you trust them.{missing}\n\n")


def _training_section(plan: Plan) -> str:
    """A block expansion's new blocks, and whether LLaMA-Factory's use_llama_pro selects exactly them."""
    from composer.training import llama_factory_fit

    new = [la.index for la in plan.layers if la.status == "new"]
    if not new:
        return ""
    settings, why = llama_factory_fit(new, len(plan.layers), [t.name for t in plan.tensors])
    text = (f"## Training\n\nLLaMA Pro trains only the inserted blocks, layers {', '.join(map(str, new))}; "
            "`composer.freeze_original(model, folder)` freezes everything else (`composer.new_layers(folder)` lists "
            f"them, e.g. for PEFT's `layers_to_transform`).")
    if settings is not None:
        return text + (" In LLaMA-Factory these settings select exactly them:\n\n```yaml\nfinetuning_type: freeze\n"
                       f"use_llama_pro: true\nfreeze_trainable_layers: {settings['freeze_trainable_layers']}\n```\n\n")
    return text + (f"\n\n**Do not use LLaMA-Factory's `use_llama_pro` with this model**: {why}, so it would train "
                   "original blocks. Use `composer.freeze_original`.\n\n")


def model_card(plan: Plan) -> str:
    bases = used_models(plan)
    front = front_matter(plan)
    what, paper = METHODS[plan.operation] if plan.operation in METHODS else _merge_method(plan.operation)
    rows = "\n".join(
        f"| {_span(*r['out'])} | {r['model']} | {_span(*r['source'])} | {r['status']}"
        f"{' (' + ', '.join(r['zeroed']) + ' zeroed)' if r['zeroed'] else ''} |"
        for r in layer_runs(plan)
    )
    counts = ", ".join(f"`{m}` ({plan.sources[m].num_layers} layers)" for m in bases if m in plan.sources)
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {plan.recipe_path.rsplit('/', 1)[-1].rsplit('.', 1)[0] if plan.recipe_path else 'composed model'}\n\n"
        f"This model was built with composer from {counts}.\n\n"
        f"{_sources_section(plan)}"
        f"## Method\n\n{what[0].upper() + what[1:]}.{' Paper: ' + paper + '.' if paper else ''}\n\n"
        f"{_remote_code_section(plan)}"
        f"## Layers\n\n{len(plan.layers)} layers, {plan.num_parameters:,} parameters.\n\n"
        "| output layers | model | source layers | status |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        "`composer_provenance.json` lists where every tensor came from; layers marked *new* are the ones to train.\n\n"
        f"{_experts_section(plan)}"
        f"{_tokenizer_section(plan)}"
        f"{_training_section(plan)}"
        f"{_stages_section(plan)}"
        f"## Recipe\n\n```yaml\n{plan.recipe_text.rstrip()}\n```\n"
    )
