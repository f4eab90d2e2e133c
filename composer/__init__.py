"""composer: build new language models out of existing ones from a short YAML recipe, streamed tensor by tensor."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from composer.errors import ComposerError, CorruptFileError, OutputError, PlanError, RecipeError, SourceError
from composer.execute import execute
from composer.plan import build_plan
from composer.recipe import Recipe, load_recipe, parse_recipe
from composer.sources import SourceModel, open_sources
from composer.tensorplan import DEFAULT_SHARD_SIZE, Plan
from composer.training import freeze_original, new_layers, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "ComposerError", "CorruptFileError", "OutputError", "PlanError", "RecipeError", "SourceError",
    "Plan", "Recipe", "SourceModel", "build_plan", "compose", "execute", "load_recipe", "parse_recipe", "plan_recipe",
    "open_sources", "freeze_original", "new_layers", "trainable_parameters",
]


def plan_recipe(
    recipe_path: str | Path, *, models: Mapping[str, str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
) -> Plan:
    """Load a recipe file, find its models (relative paths: from the cwd, then the recipe's folder), plan it."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    sources = open_sources(recipe.referenced_models(), (recipe_path.parent.resolve(),), models)
    return build_plan(recipe, sources, shard_size=shard_size, recipe_text=recipe_path.read_text(),
                      recipe_path=str(recipe_path), seed=seed)


def compose(
    recipe_path: str | Path, out: str | Path, *, models: Mapping[str, str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> Path:
    """Plan and write a recipe's model to `out`; returns the output folder."""
    plan = plan_recipe(recipe_path, models=models, shard_size=shard_size, seed=seed)
    return execute(plan, out, overwrite=overwrite, progress=progress)
