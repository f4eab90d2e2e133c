"""Everything in the output folder besides the weights: index, config, generation config, tokenizer, card, recipe, provenance."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from composer.card import model_card
from composer.remote_code import remote_code
from composer.report import provenance
from composer.tensorplan import Plan
from composer.tokenizer import tokenizer_files

RECIPE_FILE = "composer_recipe.yaml"
PROVENANCE_FILE = "composer_provenance.json"
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def generation_config(plan: Plan) -> dict[str, Any]:
    """The base model's generation_config.json, or one derived from its config as transformers does."""
    base = plan.sources[plan.base]
    if base.path is not None and (base.path / "generation_config.json").is_file():
        return json.loads((base.path / "generation_config.json").read_text())
    gen = {k: plan.config[k] for k in GENERATION_KEYS if plan.config.get(k) is not None}
    gen["_from_model_config"] = True
    return gen


def write_metadata(plan: Plan, folder: Path, index: dict[str, Any] | None) -> None:
    if index is not None:
        _dump(folder / "model.safetensors.index.json", index)
    _dump(folder / "config.json", dict(plan.config))
    _dump(folder / "generation_config.json", generation_config(plan))
    tok = plan.sources[plan.tokenizer_from]
    if plan.copy_tokenizer and plan.tokenizer is not None:
        plan.tokenizer.write(folder)
    elif plan.copy_tokenizer and tok.path is not None:
        for file in tokenizer_files(tok.path):
            shutil.copyfile(file, folder / file.name)
    code = remote_code(plan)
    for file in code.files if code else ():  # copied as bytes, never imported
        shutil.copyfile(file, folder / file.name)
    (folder / RECIPE_FILE).write_text(plan.recipe_text or "")
    _dump(folder / PROVENANCE_FILE, provenance(plan))
    if plan.write_card:
        (folder / "README.md").write_text(model_card(plan))
