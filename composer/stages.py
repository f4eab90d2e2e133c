"""Multi-document recipes: stages run in order, later ones using earlier outputs by name; finished stages are skipped."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from composer.outputs import PROVENANCE_FILE, RECIPE_FILE
from composer.plan import build_plan
from composer.recipe import Recipe, load_recipes
from composer.report import hub_bases
from composer.sources import HubOrigin, SourceModel, TensorInfo, open_model, open_sources
from composer.tensorplan import DEFAULT_SHARD_SIZE, Plan

__all__ = ["RECIPE_FILE", "Stage", "load_stages", "plan_stages", "stages_folder"]


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
    return SourceModel(name=name, path=None, config=dict(plan.config), tensors=tensors, lineage=tuple(hub_bases(plan)))


def _built_source(name: str, folder: Path) -> SourceModel:
    """An earlier stage's output, with the Hub models it was built from (from its provenance file)."""
    model = open_model(name, folder)
    try:
        hub = json.loads((folder / PROVENANCE_FILE).read_text()).get("hub_sources") or []
        lineage = tuple(HubOrigin.from_json(h) for h in hub)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        lineage = ()
    return replace(model, lineage=lineage)


def _hub_notes(plan: Plan, dry_run: bool) -> Plan:
    """Say in the plan which weights were read from pickles (and, in a dry run, that those were downloaded)."""
    notes = []
    for name, src in plan.sources.items():
        if src.hub is not None and src.hub.pickled:
            notes.append(f"weights of '{name}' read from pickle files (pytorch_model*.bin at commit "
                         f"{src.hub.commit}), loaded with weights_only=True and converted to safetensors"
                         + ("; a dry run downloads them, as pickles have no header to read" if dry_run else ""))
    return replace(plan, notes=(*plan.notes, *notes)) if notes else plan


def plan_stages(
    recipe_path: str | Path, out: Path | None, *, models: Mapping[str, str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, dry_run: bool = False, hub: Any = None,
) -> Iterator[tuple[Stage, Plan | None]]:
    """Plan each stage in order. Yields (stage, plan), or (stage, None) for an intermediate stage that an earlier
    run finished from the same recipe text; unless it is a dry run, the caller writes each plan to `stage.out`
    before asking for the next stage, which may use it as a model by name. Hub ids are fetched with `hub` (a
    composer.hub.HubClient); a dry run reads only their config, tokenizer and safetensors headers."""
    recipe_path = Path(recipe_path)
    search = (recipe_path.parent.resolve(),)
    built: dict[str, SourceModel] = {}
    for stage in load_stages(recipe_path, out):
        intermediate = stage.out is not None and stage.out != out
        if not dry_run and intermediate and stage.finished():
            built[str(stage.name)] = _built_source(str(stage.name), stage.out)
            yield stage, None
            continue
        referenced = stage.recipe.referenced_models()
        sources = open_sources([n for n in referenced if n not in built], search, models, hub=hub,
                               headers_only=dry_run)
        sources.update({n: built[n] for n in referenced if n in built})
        plan = build_plan(stage.recipe, sources, shard_size=shard_size, recipe_text=stage.text,
                          recipe_path=str(recipe_path), seed=seed)
        yield stage, _hub_notes(plan, dry_run)
        if stage.name:
            built[stage.name] = (_planned_source(stage.name, plan) if dry_run or stage.out is None
                                 else _built_source(stage.name, stage.out.resolve()))
