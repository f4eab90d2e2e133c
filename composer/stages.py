"""Multi-document recipes: stages run in order, later ones using earlier outputs by name; finished stages are skipped."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from composer.plan import DEFAULT_SHARD_SIZE, Plan, build_plan
from composer.recipe import Recipe, load_recipes
from composer.sources import SourceModel, TensorInfo, open_model, open_sources

RECIPE_FILE = "composer_recipe.yaml"


@dataclass(frozen=True)
class Stage:
    name: str | None
    recipe: Recipe
    text: str
    out: Path | None  # where it is written: the stage folder, or the final output (None for a dry run)

    def finished(self) -> bool:
        """Built by an earlier run from this very recipe text (outputs appear only once complete)."""
        return (self.out is not None and (self.out / "config.json").is_file()
                and (self.out / RECIPE_FILE).is_file() and (self.out / RECIPE_FILE).read_text() == self.text)


def stages_folder(out: Path) -> Path:
    """Where the intermediate stages of a multi-document recipe go: `OUT.stages/` beside the output."""
    return out.parent / f"{out.name}.stages"


def load_stages(recipe_path: str | Path, out: Path | None) -> list[Stage]:
    docs = load_recipes(recipe_path)
    stages = []
    for k, (recipe, text) in enumerate(docs):
        last = k == len(docs) - 1
        dest = out if last or out is None else stages_folder(out) / str(recipe.name)
        stages.append(Stage(recipe.name, recipe, text, dest))
    return stages


def _planned_source(name: str, plan: Plan) -> SourceModel:
    """An unbuilt stage as a later stage sees it in a dry run: its config and tensor shapes, no files."""
    tensors = {t.name: TensorInfo(t.name, t.dtype, t.shape, None, 0) for t in plan.tensors}
    return SourceModel(name=name, path=None, config=dict(plan.config), tensors=tensors)


def plan_stages(
    recipe_path: str | Path, out: Path | None, *, models: Mapping[str, str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, dry_run: bool = False,
) -> Iterator[tuple[Stage, Plan | None]]:
    """Plan each stage in order. Yields (stage, plan), or (stage, None) for an intermediate stage that an earlier
    run finished from the same recipe text; unless it is a dry run, the caller writes each plan to `stage.out`
    before asking for the next stage, which may use it as a model by name."""
    recipe_path = Path(recipe_path)
    search = (recipe_path.parent.resolve(),)
    built: dict[str, SourceModel] = {}
    for stage in load_stages(recipe_path, out):
        intermediate = stage.out is not None and stage.out != out
        if not dry_run and intermediate and stage.finished():
            built[str(stage.name)] = open_model(str(stage.name), stage.out)
            yield stage, None
            continue
        referenced = stage.recipe.referenced_models()
        sources = open_sources([n for n in referenced if n not in built], search, models)
        sources.update({n: built[n] for n in referenced if n in built})
        plan = build_plan(stage.recipe, sources, shard_size=shard_size, recipe_text=stage.text,
                          recipe_path=str(recipe_path), seed=seed)
        yield stage, plan
        if stage.name:
            built[stage.name] = (_planned_source(stage.name, plan) if dry_run or stage.out is None
                                 else open_model(stage.name, stage.out.resolve()))
