"""The `compose` command: recipe in, model folder out; composer errors become one line on stderr."""
from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import click

from composer import plan_recipe
from composer.errors import ComposerError
from composer.execute import check_destination, execute
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
    try:
        plan = plan_recipe(recipe, models=overrides, shard_size=size, seed=seed)
        info = summary(plan, out)
        if dry_run:
            click.echo(json.dumps(info, indent=2) if as_json else render(info))
            return
        check_destination(plan, out, overwrite)  # refuse before a progress bar appears
        from tqdm import tqdm

        with tqdm(total=plan.file_bytes, unit="B", unit_scale=True, desc="composing", disable=quiet,
                  file=sys.stderr) as bar:
            folder = execute(plan, out, overwrite=overwrite, progress=bar.update)
    except ComposerError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps({**info, "output": str(folder)}, indent=2))
    elif not quiet:
        click.echo(f"wrote {folder} ({len(plan.layers)} layers, {plan.num_parameters:,} parameters, "
                   f"{human_bytes(plan.file_bytes)})", err=True)


if __name__ == "__main__":
    main()
