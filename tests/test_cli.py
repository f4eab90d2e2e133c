"""A bad command line is one line on stderr (`Error: ...`), exit status 2, no usage block and no traceback, for
compose, compose verify and compose-push alike."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-llama-pro.yaml")
COMPOSE = [sys.executable, "-c", "from composer.cli import run; run()"]
PUSH = [sys.executable, "-c", "from composer.cli import push; push()"]


@pytest.mark.parametrize(("cmd", "expected"), [
    (COMPOSE + [TINY, "--bogus"], "No such option '--bogus'"),
    (COMPOSE + [TINY], "give an output folder: compose RECIPE OUT (or -o OUT)"),
    (COMPOSE + [TINY, "a", "-o", "b"], "two output folders"),
    (COMPOSE + [TINY, "out", "-j", "0"], "-j"),
    (COMPOSE + [TINY, "out", "--shard-size", "lots"], "is not a size"),
    (COMPOSE + [], "Missing argument 'RECIPE'"),
    (COMPOSE + ["verify", str(ROOT), "--bogus"], "No such option '--bogus'"),
    (PUSH + [str(ROOT)], "Missing argument 'ORG/NAME'"),
], ids=["unknown-option", "no-output", "two-outputs", "zero-jobs", "bad-size", "no-recipe", "verify", "push"])
def test_bad_command_line_is_one_line(cmd, expected, tmp_path):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and expected in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()


def test_help_and_version_still_exit_zero():
    for args in (["-h"], ["--version"], ["verify", "-h"]):
        proc = subprocess.run(COMPOSE + args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout and not proc.stderr, (args, proc.stderr)
