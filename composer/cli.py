"""The `compose` command: recipe in, model folder out; composer errors become one line on stderr."""
from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import click

from composer.errors import ComposerError
from composer.execute import check_destination, check_empty, execute
from composer.stages import plan_stages
from composer.plan import DEFAULT_SHARD_SIZE
from composer.report import human_bytes, render, summary

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"'{text}' is not a size: write it like 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise click.BadParameter("the shard size must be positive")
    return size


def _parse_models(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"'{pair}' is not NAME=PATH (for example org/model=/data/model)")
        out[name] = path
    return out


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)  # unwinds through execute's cleanup, so no partial folder survives


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), help="Output model folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan (layer map, sizes, memory, free space) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan, or the result, as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--shard-size", default=str(DEFAULT_SHARD_SIZE), show_default=True,
              help="Largest output shard, e.g. 5GB, 2GiB, 500MB.")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH",
              help="Use the folder PATH wherever the recipe names model NAME (repeatable).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random merge methods (DARE, DELLA).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.version_option(package_name="composer-llm", prog_name="compose")
def main(recipe: Path, out: Path | None, dry_run: bool, as_json: bool, overwrite: bool, shard_size: str,
         models: tuple[str, ...], seed: int, quiet: bool) -> None:
    """Compose a new model from the YAML RECIPE into the folder OUT."""
    size = parse_size(shard_size)
    overrides = _parse_models(models)
    if out is None and not dry_run:
        raise click.UsageError("give an output folder with -o OUT, or --dry-run to only see the plan")
    signal.signal(signal.SIGTERM, _terminate)
    infos, wrote = [], []
    try:
        if out is not None and not dry_run:
            check_empty(out.resolve(), overwrite)  # refuse before any stage runs
        stages = plan_stages(recipe, out, models=overrides, shard_size=size, seed=seed, dry_run=dry_run)
        for stage, plan in stages:
            if plan is None:  # said even with --quiet: the run did less than the recipe asks, on purpose
                click.echo(f"stage {stage.name}: already built in {stage.out}, skipped", err=True)
                continue
            final = stage.out == out
            info = summary(plan, stage.out)
            infos.append({"stage": stage.name, **info} if stage.name else info)
            if dry_run:
                if not as_json:
                    click.echo((f"== stage {stage.name}\n" if stage.name else "") + render(info))
                continue
            check_destination(plan, stage.out, overwrite or not final)  # refuse before a progress bar appears
            from tqdm import tqdm

            label = "composing" if final else f"stage {stage.name}"
            with tqdm(total=plan.file_bytes, unit="B", unit_scale=True, desc=label, disable=quiet,
                      file=sys.stderr) as bar:
                folder = execute(plan, stage.out, overwrite=overwrite or not final, progress=bar.update)
            wrote.append({**infos[-1], "output": str(folder)})
            if not quiet:
                click.echo(f"wrote {folder} ({len(plan.layers)} layers, {plan.num_parameters:,} parameters, "
                           f"{human_bytes(plan.file_bytes)})", err=True)
    except ComposerError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the stage being written was removed", err=True)
        sys.exit(130)
    if as_json:
        shown = infos if dry_run else wrote
        click.echo(json.dumps(shown[0] if len(shown) == 1 and "stage" not in shown[0] else {"stages": shown},
                              indent=2))

if __name__ == "__main__":
    main()
