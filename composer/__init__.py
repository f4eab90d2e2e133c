"""composer: build new language models out of existing ones from a short YAML recipe, streamed tensor by tensor."""
from __future__ import annotations

from composer.api import ComposeResult, PushResult, compose, plan_recipe, push
from composer.errors import ComposerError, CorruptFileError, OutputError, PlanError, RecipeError, SourceError
from composer.execute import execute
from composer.plan import build_plan
from composer.recipe import Recipe, load_recipe, parse_recipe
from composer.sources import SourceModel, open_sources
from composer.tensorplan import Plan
from composer.training import freeze_original, new_layers, trainable_parameters

__version__ = "0.2.0"

__all__ = [
    "ComposerError", "CorruptFileError", "OutputError", "PlanError", "RecipeError", "SourceError",
    "ComposeResult", "Plan", "PushResult", "Recipe", "SourceModel", "build_plan", "compose", "execute",
    "load_recipe", "parse_recipe", "plan_recipe", "push", "open_sources", "freeze_original", "new_layers",
    "trainable_parameters",
]
