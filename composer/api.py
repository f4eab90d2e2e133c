"""The Python API: plan_recipe, compose (a recipe as a path, a dict or YAML text, every stage, as the CLI runs it)
and push, with their frozen results."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import yaml

from composer.errors import RecipeError
from composer.execute import check_empty, execute
from composer.plan import build_plan
from composer.recipe import parse_recipe, read_recipe_text
from composer.sources import open_sources
from composer.stages import plan_stages
from composer.tensorplan import DEFAULT_SHARD_SIZE, WORKERS, Plan

RecipeInput = Union[str, "os.PathLike[str]", Mapping[str, Any]]
INLINE = "<recipe>"  # the name messages give a recipe passed as a dict or as text


@dataclass(frozen=True)
class ComposeResult:
    """What compose() wrote: the output folder, the plan of every stage it built (the output's last), and the
    output's figures. `os.fspath(result)` and `result / "config.json"` work as with the Path compose() returned
    up to 0.2.0."""

    path: Path
    plans: tuple[Plan, ...]  # the stages built by this call, in order; a reused stage has none
    reused: tuple[str, ...]  # intermediate stages an earlier run had built from the same fingerprint

    @property
    def plan(self) -> Plan:
        """The output's plan (the last stage's)."""
        return self.plans[-1]

    @property
    def tensors(self) -> int:
        return len(self.plan.tensors)

    @property
    def parameters(self) -> int:
        return self.plan.num_parameters

    @property
    def bytes(self) -> int:
        """Size of the output's safetensors shards."""
        return self.plan.file_bytes

    @property
    def shards(self) -> int:
        return len(self.plan.shards)

    @property
    def layers(self) -> int:
        return len(self.plan.layers)

    @property
    def new_layers(self) -> list[int]:
        """A block expansion's inserted blocks (composer.training.new_layers(path) reads the same from disk)."""
        return [la.index for la in self.plan.layers if la.status == "new"]

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other


@dataclass(frozen=True)
class PushResult:
    """Where push() uploaded a folder: the repo's URL, the Hub commit and the branch."""

    repo_url: str
    commit: str
    revision: str


def recipe_source(recipe: RecipeInput) -> tuple[Path, str | None]:
    """(the path messages name, the recipe's text or None to read it from that path). A dict is dumped as YAML; a
    string is a path when such a file exists or it is one line that does not read as a YAML mapping, else text."""
    if isinstance(recipe, Mapping):
        return Path(INLINE), yaml.safe_dump(dict(recipe), sort_keys=False)
    if isinstance(recipe, os.PathLike):
        return Path(recipe), None
    if not isinstance(recipe, str):
        raise RecipeError(f"a recipe is a path, a dict or YAML text, not {type(recipe).__name__}")
    if "\n" not in recipe.strip() and (Path(recipe).is_file() or not _is_mapping(recipe)):
        return Path(recipe), None
    return Path(INLINE), recipe


def _is_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def output_options(plan: Plan, *, copy_tokenizer: bool = True, write_model_card: bool = True) -> Plan:
    """The final output's plan with mergekit's output switches (--no-copy-tokenizer, --no-write-model-card)."""
    notes = [*plan.notes, *(["no tokenizer files (--no-copy-tokenizer)"] if not copy_tokenizer else []),
             *(["no model card, README.md (--no-write-model-card)"] if not write_model_card else [])]
    return replace(plan, copy_tokenizer=copy_tokenizer, write_card=write_model_card, notes=tuple(notes))


def plan_recipe(
    recipe: RecipeInput, *, models: Mapping[str, str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0, allow_crimes: bool = False,
) -> Plan:
    """Plan a one-document recipe (a path, a dict or YAML text) from headers alone. Relative model paths: from the
    current folder, then the recipe file's folder. An inline recipe's plan has no recipe_path. For a multi-document recipe use compose(), or
    composer.stages.plan_stages."""
    path, text = recipe_source(recipe)
    text = read_recipe_text(path) if text is None else text
    parsed = parse_recipe(text, str(path))
    search = (path.parent.resolve(),) if str(path) != INLINE else ()
    sources = open_sources(parsed.referenced_models(), search, models)
    return build_plan(parsed, sources, shard_size=shard_size, recipe_text=text,
                      recipe_path="" if str(path) == INLINE else str(path), seed=seed, allow_crimes=allow_crimes)


def compose(
    recipe: RecipeInput, out: str | os.PathLike[str], *, models: Mapping[str, str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, progress: Callable[[int], None] | None = None,
    seed: int = 0, jobs: int = WORKERS, allow_crimes: bool = False, copy_tokenizer: bool = True,
    write_model_card: bool = True, rebuild: bool = False, hub: Any = None,
) -> ComposeResult:
    """Plan and write a recipe's model to `out`, every stage of a multi-document recipe in order, as `compose
    RECIPE OUT` does (stages in `OUT.stages/`, reused when their fingerprint is unchanged unless `rebuild`).
    `recipe` is a path, a dict or YAML text; `jobs` is compose -j; `progress` is called with the bytes written, for
    every stage; `hub` a composer.hub.HubClient (default: one reading HF_TOKEN, HF_HOME, ...). Raises a
    composer.ComposerError, and writes nothing at `out`, on failure."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: give 1 or more merge workers")
    path, text = recipe_source(recipe)
    out = Path(out).resolve()
    check_empty(out, overwrite)  # before any stage runs
    plans: list[Plan] = []
    reused: list[str] = []
    for stage, plan in plan_stages(path, out, models=models, shard_size=shard_size, seed=seed, hub=hub,
                                   rebuild=rebuild, allow_crimes=allow_crimes, text=text):
        if plan is None:
            reused.append(str(stage.name))
            continue
        final = stage.out == out
        if final:
            plan = output_options(plan, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
        execute(plan, stage.out, overwrite=overwrite or not final, progress=progress, workers=jobs)
        plans.append(plan)
    return ComposeResult(out, tuple(plans), tuple(reused))


def push(folder: str | os.PathLike[str], repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, hub: Any = None) -> PushResult:
    """Upload a composed folder to the Hub repo `repo_id` (created if missing; `private` applies then) on branch
    `revision` (created if missing), as compose-push does; a rerun after an interruption sends only what the Hub
    lacks. The token comes from HF_TOKEN or `hf auth login`. Raises composer.PushError (a ComposerError)."""
    from composer.hub import HubClient

    result = (hub or HubClient()).push(Path(folder).resolve(), repo_id, private=private, revision=revision,
                                       commit_message=commit_message)
    return PushResult(result["repo_url"], result["commit"], result["revision"])
