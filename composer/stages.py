"""Multi-document recipes: stages run in order, later ones using earlier outputs by name; a stage an earlier run built
from the same fingerprint is reused."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from composer.errors import RecipeError
from composer.outputs import PROVENANCE_FILE, RECIPE_FILE
from composer.plan import build_plan
from composer.recipe import Recipe, load_recipes, parse_recipes, read_recipe_text
from composer.report import hub_bases
from composer.sources import HubOrigin, SourceModel, TensorInfo, open_model, open_sources
from composer.tensorplan import DEFAULT_SHARD_SIZE, Plan

__all__ = ["FINGERPRINT_FILE", "RECIPE_FILE", "Stage", "fingerprint", "load_stages", "plan_stages", "stages_folder"]


FINGERPRINT_FILE = "composer_fingerprint.json"  # in an intermediate stage's folder: what its bytes depend on


@dataclass(frozen=True)
class Stage:
    name: str | None
    recipe: Recipe
    text: str
    out: Path | None  # where it is written: the stage folder, or the final output (None for a dry run)
    rebuilt: str | None = None  # why an earlier run's output of this stage is not reused

    def stale(self, fingerprint: dict[str, Any]) -> str | None:
        """Why the stage folder an earlier run built cannot stand for this run's (None: it can). Outputs appear
        only once complete; the fingerprint is written after."""
        if self.out is None or not (self.out / "config.json").is_file():
            return None if self.out is None else "not built yet"
        try:
            old = json.loads((self.out / FINGERPRINT_FILE).read_text())
        except (OSError, ValueError):
            return "its folder has no fingerprint (built by an older composer, or interrupted)"
        for key, what in (("recipe", "the document changed"), ("seed", "--seed changed"),
                          ("shard_size", "--shard-size changed"), ("composer", "composer's version changed")):
            if old.get(key) != fingerprint[key]:
                return what
        for model, identity in fingerprint["inputs"].items():
            if (old.get("inputs") or {}).get(model) != identity:
                return f"input '{model}' changed ({_how(identity)})"
        return None


def _how(identity: dict[str, Any]) -> str:
    return ("its Hub commit" if "commit" in identity else "the stage it is" if "stage" in identity
            else "its files' sizes or modification times")


def _identity(source: SourceModel, stage_prints: Mapping[str, str]) -> dict[str, Any]:
    """What a stage's input is, for its fingerprint: an earlier stage's own fingerprint, a Hub commit, or the
    sizes and modification times of a local folder's files."""
    if source.name in stage_prints:
        return {"stage": stage_prints[source.name]}
    if source.hub is not None and source.hub.commit:
        return {"hub": source.hub.repo_id, "commit": source.hub.commit}
    files = [*source.files, *([source.path / "config.json"] if source.path else [])]
    return {"files": [[str(f), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]}


def fingerprint(stage: Stage, sources: Mapping[str, SourceModel], stage_prints: Mapping[str, str], seed: int,
                shard_size: int) -> dict[str, Any]:
    """Everything a stage's bytes depend on: its document, its resolved inputs, --seed, --shard-size, and
    composer's version (the dtype options are in the document)."""
    from composer import __version__

    return {"recipe": stage.text, "seed": seed, "shard_size": shard_size, "composer": __version__,
            "inputs": {n: _identity(sources[n], stage_prints) for n in stage.recipe.referenced_models()}}


def _digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def stages_folder(out: Path) -> Path:
    """Where the intermediate stages of a multi-document recipe go: `OUT.stages/` beside the output."""
    return out.parent / f"{out.name}.stages"


def _check_order(docs: list[tuple[Recipe, str]], path: str | Path) -> None:
    """A stage may use only the stages before it: one that uses itself or a later one (a cycle) is refused."""
    position = {recipe.name: k for k, (recipe, _) in enumerate(docs) if recipe.name}
    for k, (recipe, _) in enumerate(docs):
        who = f"stage '{recipe.name}'" if recipe.name else "the last stage"
        for model in recipe.referenced_models():
            if position.get(model) == k:
                raise RecipeError(f"{path}: {who} uses itself as a model: name an earlier stage, or write "
                                  f"./{model} for a folder of that name")
            if position.get(model, -1) > k:
                raise RecipeError(f"{path}: {who} uses stage '{model}', which comes after it: a stage can use only "
                                  f"the stages before it, so move '{model}' up (stages that use each other cannot "
                                  "be built)")


def load_stages(recipe_path: str | Path, out: Path | None, text: str | None = None) -> list[Stage]:
    """The recipe's documents as stages; `text`, when given, is the recipe (and `recipe_path` only its name)."""
    docs = load_recipes(recipe_path) if text is None else parse_recipes(text, str(recipe_path))
    _check_order(docs, recipe_path)
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


def _operation(folder: Path) -> str:
    """What an earlier run's stage was (its provenance's operation)."""
    try:
        return str(json.loads((folder / PROVENANCE_FILE).read_text()).get("operation") or "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"


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
    rebuild: bool = False, allow_crimes: bool = False, text: str | None = None,
) -> Iterator[tuple[Stage, Plan | None]]:
    """Plan each stage in order. Yields (stage, plan), or (stage, None) for an intermediate stage that an earlier
    run built from the same fingerprint (the document, the resolved inputs, --seed, --shard-size, composer's
    version; `rebuild` reuses none); a rebuilt stage says why in `stage.rebuilt`. Unless it is a dry run, the
    caller writes each plan to `stage.out` before asking for the next stage, which may use it as a model by name.
    Hub ids are fetched with `hub` (a composer.hub.HubClient); a dry run reads only their config, tokenizer and
    safetensors headers. `text`, when given, is the recipe itself (`recipe_path` then only names it in messages, and
    relative model paths are looked up from the current folder); `allow_crimes` is build_plan's."""
    recipe_path = Path(recipe_path)
    search = (recipe_path.parent.resolve(),) if text is None else ()
    built: dict[str, SourceModel] = {}
    prints: dict[str, str] = {}  # stage name -> the digest of its fingerprint
    history: list[tuple[str, str]] = []  # the earlier stages, for the final output's card: (name, operation)
    whole_text = read_recipe_text(recipe_path) if text is None else text
    stages = load_stages(recipe_path, out, whole_text)
    for k, stage in enumerate(stages):
        intermediate = stage.out is not None and stage.out != out
        last = k == len(stages) - 1
        referenced = stage.recipe.referenced_models()
        unbuilt = [n for n in referenced if n not in built]
        probe = open_sources(unbuilt, search, models, hub=hub, headers_only=True)
        probe.update({n: built[n] for n in referenced if n in built})
        print_ = fingerprint(stage, probe, prints, seed, shard_size)
        if not dry_run and intermediate:
            why = "--rebuild" if rebuild else stage.stale(print_)
            if why is None:
                built[str(stage.name)] = _built_source(str(stage.name), stage.out)
                prints[str(stage.name)] = _digest(print_)
                history.append((str(stage.name), _operation(stage.out)))
                yield stage, None
                continue
            if why != "not built yet":
                stage = replace(stage, rebuilt=why)
        sources = probe if dry_run else {**open_sources(unbuilt, search, models, hub=hub),
                                         **{n: built[n] for n in referenced if n in built}}
        whole = last and len(stages) > 1  # the output's recipe file and card hold every stage
        plan = build_plan(stage.recipe, sources, shard_size=shard_size,
                          recipe_text=whole_text if whole else stage.text,
                          recipe_path=str(recipe_path) if text is None else "",
                          seed=seed, allow_crimes=allow_crimes)
        if whole:
            plan = replace(plan, stages=tuple(history))
        elif stage.name:
            history.append((stage.name, plan.operation))
        yield stage, _hub_notes(plan, dry_run)
        if stage.name:
            prints[stage.name] = _digest(print_)
            if intermediate and not dry_run and (stage.out / "config.json").is_file():
                (stage.out / FINGERPRINT_FILE).write_text(json.dumps(print_, indent=2) + "\n")
            built[stage.name] = (_planned_source(stage.name, plan) if dry_run or stage.out is None
                                 else _built_source(stage.name, stage.out.resolve()))
