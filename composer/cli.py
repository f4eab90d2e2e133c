"""The `compose` and `compose-push` commands: recipe in, model folder (and Hub repo) out; composer errors become one
line on stderr."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import click

from composer.api import output_options
from composer.errors import ComposerError
from composer.execute import check_destination, check_empty, execute
from composer.hub import HubClient
from composer.mergekit_flags import mergekit_flags
from composer.report import human_bytes, render, summary
from composer.stages import plan_stages
from composer.tensorplan import DEFAULT_SHARD_SIZE, WORKERS

# Bytes. K, M and B are mergekit's --out-shard-size suffixes (thousand, million, billion: 5B is five billion
# bytes), beside the decimal and binary byte units.
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"'{text}' is not a size: write it like 5GB, 500MB, 2GiB or mergekit's 5B")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise click.BadParameter("the shard size must be positive")
    if not m.group(2) and size < 10**6:
        raise click.BadParameter(f"'{text}' is {size} bytes, which would put nearly every tensor in a shard of its "
                                 f"own: give a unit (5GB, or {size}KB if you mean it)")
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


def _push_options(f):
    for option in reversed((
        click.option("--private", is_flag=True, help="Create the Hub repo private (if it does not exist yet)."),
        click.option("--revision", metavar="BRANCH", help="Push to this branch (created if missing) instead of main."),
        click.option("--commit-message", metavar="TEXT", help="Message of the Hub commit."),
    )):
        f = option(f)
    return f


def _pushed(result: dict, quiet: bool) -> None:
    if not quiet:
        click.echo(f"pushed to {result['repo_url']} (revision {result['revision']}, commit {result['commit']})",
                   err=True)


def _one_line_main(command: click.Command, args, prog_name, extra: dict):
    """Run a click command as click's standalone mode does, except that a bad command line is one line on stderr
    (click prints the usage and a hint above it): `Error: ...`, exit status 2."""
    if not extra.pop("standalone_mode", True):
        return click.Command.main(command, args, prog_name, standalone_mode=False, **extra)
    try:
        code = click.Command.main(command, args, prog_name, standalone_mode=False, **extra)
    except click.UsageError as exc:
        hint = f" ({exc.ctx.command_path} -h lists the options)" if exc.ctx is not None and \
            isinstance(exc, click.NoSuchOption) else ""
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


class _OneLineCommand(click.Command):
    def main(self, args=None, prog_name=None, **extra):
        return _one_line_main(self, args, prog_name, extra)


class _ComposeCommand(_OneLineCommand):
    """`compose RECIPE ...`, and `compose verify OUT ...` (composer.verify) when the first argument is `verify`."""

    def main(self, args=None, prog_name=None, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] == ["verify"]:
            from composer.verify import verify_command

            return _one_line_main(verify_command, argv[1:], f"{prog_name or 'compose'} verify", extra)
        return super().main(args, prog_name, **extra)


@click.command(cls=_ComposeCommand, context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Check a composed folder against its sources: compose verify OUT (see compose verify --help). "
                      "mergekit-yaml's other flags are accepted where composer already does what they ask and refused "
                      "with composer's equivalent otherwise: see the README, \"Coming from mergekit\".")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_arg", metavar="[OUT]", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output model folder (or give it after RECIPE, as mergekit-yaml RECIPE OUT).")
@click.option("--dry-run", is_flag=True, help="Print the plan (layer map, sizes, memory, free space) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan, or the result, as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--shard-size", "--out-shard-size", "shard_size", default=str(DEFAULT_SHARD_SIZE), show_default=True,
              help="Largest output shard in bytes, e.g. 5GB, 2GiB, 500MB, or mergekit's 5B (five billion); "
                   "--out-shard-size is mergekit's name for it.")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH",
              help="Use the folder PATH wherever the recipe names model NAME (repeatable).")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True,
              help="Seed of the random merge methods (DARE, DELLA); --random-seed is mergekit's name for it.")
@click.option("-j", "--jobs", "--num-threads", "jobs", type=click.IntRange(min=1), default=WORKERS, show_default=True,
              help="Merge workers: output chunks computed at once and threads of the statistics passes, each running "
                   "torch on one thread, so N uses N cores (mergekit's -j/--num-threads).")
@click.option("--allow-crimes/--no-allow-crimes", default=False, show_default=True,
              help="Combine models of different architectures wherever their tensor names and shapes agree; the "
                   "config comes from the base model (as mergekit's --allow-crimes).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Write the tokenizer files into OUT.")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
              help="Write the model card, OUT/README.md (the recipe and provenance files are written either way).")
@click.option("-q", "--quiet/--no-quiet", default=False, help="No progress bar or messages, only errors.")
@click.option("-v", "--verbose", count=True, help="Print each stage's plan before writing it, and log what the Hub "
              "client does (-vv: debug logging).")
@click.option("--rebuild", is_flag=True, help="Build every stage of a multi-document recipe again, even one an earlier "
              "run built from the same recipe, inputs and options.")
@click.option("--push-to-hub", "push_to", metavar="ORG/NAME", help="After composing, upload OUT to this Hub repo.")
@_push_options
@mergekit_flags
@click.version_option(package_name="composer-llm", prog_name="compose")
def main(recipe: Path, out_arg: Path | None, out: Path | None, dry_run: bool, as_json: bool, overwrite: bool,
         shard_size: str, models: tuple[str, ...], seed: int, jobs: int, allow_crimes: bool, copy_tokenizer: bool,
         write_model_card: bool, quiet: bool, verbose: int, rebuild: bool, push_to: str | None, private: bool,
         revision: str | None, commit_message: str | None) -> None:
    """Compose a new model from the YAML RECIPE into the folder OUT. Models are local folders or Hub ids
    (org/name, org/name@revision); HF_TOKEN, HF_HOME and HF_HUB_OFFLINE apply."""
    size = parse_size(shard_size)
    overrides = _parse_models(models)
    if out_arg is not None and out is not None and out_arg.resolve() != out.resolve():
        raise click.UsageError(f"two output folders, {out_arg} and -o {out}: give one")
    out = out or out_arg
    if out is None and not dry_run:
        raise click.UsageError("give an output folder: compose RECIPE OUT (or -o OUT), or --dry-run to only see "
                               "the plan")
    if push_to and dry_run:
        raise click.UsageError("--push-to-hub uploads a composed model: drop --dry-run")
    if not push_to and (private or revision or commit_message):
        raise click.UsageError("--private, --revision and --commit-message go with --push-to-hub ORG/NAME")
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    infos, wrote, pushed = [], [], None
    hub = HubClient()
    try:
        if push_to:
            hub.check_push(push_to)  # refuse before composing: offline, no token, a token the Hub rejects
        if out is not None and not dry_run:
            check_empty(out.resolve(), overwrite)  # refuse before any stage runs
        stages = plan_stages(recipe, out, models=overrides, shard_size=size, seed=seed, dry_run=dry_run, hub=hub,
                             rebuild=rebuild, allow_crimes=allow_crimes)
        for stage, plan in stages:
            if plan is None:  # said even with --quiet: the run did less than the recipe asks, on purpose
                click.echo(f"stage {stage.name}: already built in {stage.out} from the same recipe, inputs and "
                           "options, skipped (--rebuild to build it again)", err=True)
                continue
            if stage.rebuilt:
                click.echo(f"stage {stage.name}: rebuilding {stage.out}: {stage.rebuilt}", err=True)
            final = stage.out == out
            if final:
                plan = output_options(plan, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
            info = summary(plan, stage.out, workers=jobs)
            infos.append({"stage": stage.name, **info} if stage.name else info)
            if dry_run:
                if not as_json:
                    click.echo((f"== stage {stage.name}\n" if stage.name else "") + render(info))
                continue
            check_destination(plan, stage.out, overwrite or not final)  # refuse before a progress bar appears
            if verbose:
                click.echo((f"== stage {stage.name}\n" if stage.name else "") + render(info), err=True)
            from tqdm import tqdm

            label = "composing" if final else f"stage {stage.name}"
            said: list[str] = []  # warnings, printed once the progress bar is gone
            with tqdm(total=plan.file_bytes, unit="B", unit_scale=True, desc=label, disable=quiet,
                      file=sys.stderr) as bar:
                folder = execute(plan, stage.out, overwrite=overwrite or not final, progress=bar.update,
                                 warn=said.append, workers=jobs)
            for line in said:
                click.echo(f"warning: {line}", err=True)
            wrote.append({**infos[-1], "output": str(folder)})
            if not quiet:
                click.echo(f"wrote {folder} ({len(plan.layers)} layers, {plan.num_parameters:,} parameters, "
                           f"{human_bytes(plan.file_bytes)})", err=True)
                training = info.get("training")
                if final and training and training["llama_factory"] is None:  # it would train original blocks
                    click.echo(f"warning: {training['advice']}", err=True)
        if push_to and out is not None:
            pushed = hub.push(out.resolve(), push_to, private=private, revision=revision,
                              commit_message=commit_message)
            _pushed(pushed, quiet)
    except ComposerError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the stage being written was removed", err=True)
        sys.exit(130)
    if as_json:
        shown = infos if dry_run else wrote
        result = shown[0] if len(shown) == 1 and "stage" not in shown[0] else {"stages": shown}
        click.echo(json.dumps({**result, **({"hub": pushed} if pushed else {})}, indent=2))


@click.command(cls=_OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@_push_options
@click.option("--json", "as_json", is_flag=True, help='Print {"hub": {"repo_url", "commit", "revision"}}.')
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json).")
@click.version_option(package_name="composer-llm", prog_name="compose-push")
def push(out: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None, as_json: bool,
         quiet: bool) -> None:
    """Upload the composed model folder OUT to the Hub repo ORG/NAME (created if missing). Run it again after an
    interruption: files the Hub already has are not sent again. The token comes from HF_TOKEN or `hf auth login`."""
    try:
        result = HubClient().push(out.resolve(), repo_id, private=private, revision=revision,
                                  commit_message=commit_message)
    except ComposerError as exc:
        raise click.ClickException(str(exc)) from None
    _pushed(result, quiet)
    if as_json:
        click.echo(json.dumps({"hub": result}, indent=2))


def run() -> None:
    """The `compose` console script: main(), then, once torch is loaded, an exit without the interpreter's
    teardown. Freeing torch's modules and objects one by one took ~0.8 s after a 1.1B merge had finished and
    moved its output into place; nothing is left to flush by then but the standard streams and logging."""
    try:
        main.main(prog_name="compose")
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if "torch" not in sys.modules:
        sys.exit(code)
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
