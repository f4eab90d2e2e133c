"""Runs the composite GitHub Action in action.yml locally, step by step, the way the runner would.

`ActionRun` parses action.yml and, for each step in order: evaluates `if:` (implicitly `success() && ...` unless it
calls a status function) and `env:` with a small evaluator of the expressions the action uses (inputs.*, steps.*.
outputs.* / outcome / conclusion, env.*, github.action_path, runner.temp / os, toJSON(), always(), success(),
failure(), ==, !=, &&, ||, !); skips `uses:` steps after checking which actions they are and evaluating their
`if:` and `with:`; runs each `run:` script with `bash --noprofile --norc -eo pipefail` (what `shell: bash` means),
in a scratch workspace, with fresh GITHUB_OUTPUT / GITHUB_ENV / GITHUB_PATH / GITHUB_STEP_SUMMARY files per step,
GITHUB_ACTION_PATH at this checkout and the venv's bin on PATH; parses the file commands (`name=value` and
`name<<DELIM` heredocs) into the steps context, and finally evaluates the action's `outputs:`.
Installation is skipped with COMPOSER_ACTION_SKIP_INSTALL=1: the `compose` under test is the venv's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hubserver import FakeHub

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
RECIPE = ROOT / "recipes" / "tiny-llama-pro.yaml"
BIN = Path(sys.executable).parent  # the venv that runs the tests has `compose`
EXPECTED_USES = {"actions/setup-python@v5", "actions/cache@v4"}
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # the shape of a real token (hf_ + 34 characters)
STATUS_FUNCTIONS = ("always", "success", "failure", "cancelled")


# ---------------------------------------------------------------------------------------------------------------
# A tiny evaluator of GitHub Actions expressions
# ---------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:(?P<op>==|!=|&&|\|\||[!(),])|'(?P<str>(?:[^']|'')*)'|(?P<num>\d+(?:\.\d+)?)
                        |(?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*))""", re.X)


def _tokens(text: str) -> list[tuple[str, object]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"cannot parse expression at {text[pos:]!r}")
        pos = m.end()
        if m.group("op") is not None:
            out.append(("op", m.group("op")))
        elif m.group("str") is not None:
            out.append(("lit", m.group("str").replace("''", "'")))
        elif m.group("num") is not None:
            out.append(("lit", float(m.group("num"))))
        else:
            name = m.group("name")
            out.append(("lit", {"true": True, "false": False, "null": None}[name]) if name in ("true", "false", "null")
                       else ("name", name))
    return out


def _text(value) -> str:
    """How the runner turns a value into a string (env values, `with:` values, interpolation)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=2)
    return str(value)


def _truthy(value) -> bool:
    return value not in (None, False, "", 0, 0.0)


def _equal(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()  # string comparison is case-insensitive
    if type(a) is type(b):
        return a == b
    # Mixed types compare as numbers (null, '' and false are 0, true is 1, '3' is 3): a missing output == ''.
    def num(v):
        if isinstance(v, bool):
            return float(v)
        if isinstance(v, (int, float)):
            return float(v)
        if v is None or v == "":
            return 0.0
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")
    return num(a) == num(b)


class Evaluator:
    def __init__(self, contexts: dict, status: str):
        self.contexts = contexts
        self.status = status  # "success" or "failure" so far

    def evaluate(self, expr: str):
        self.toks, self.i = _tokens(expr), 0
        value = self._or()
        if self.i != len(self.toks):
            raise ValueError(f"unexpected {self.toks[self.i]} in {expr!r}")
        return value

    def _peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def _take(self, op: str) -> bool:
        if self._peek() == ("op", op):
            self.i += 1
            return True
        return False

    def _or(self):
        left = self._and()
        while self._take("||"):
            right = self._and()
            left = left if _truthy(left) else right
        return left

    def _and(self):
        left = self._eq()
        while self._take("&&"):
            right = self._eq()
            left = right if _truthy(left) else left
        return left

    def _eq(self):
        left = self._unary()
        while True:
            if self._take("=="):
                left = _equal(left, self._unary())
            elif self._take("!="):
                left = not _equal(left, self._unary())
            else:
                return left

    def _unary(self):
        if self._take("!"):
            return not _truthy(self._unary())
        return self._primary()

    def _primary(self):
        kind, value = self._peek()
        self.i += 1
        if kind == "lit":
            return value
        if (kind, value) == ("op", "("):
            inner = self._or()
            assert self._take(")"), "missing )"
            return inner
        if kind == "name":
            if self._take("("):
                args = []
                if not self._take(")"):
                    args.append(self._or())
                    while self._take(","):
                        args.append(self._or())
                    assert self._take(")"), "missing ) after arguments"
                return self._call(value, args)
            return self._lookup(value)
        raise ValueError(f"unexpected {value!r}")

    def _call(self, name: str, args: list):
        name = name.lower()
        if name == "always":
            return True
        if name == "success":
            return self.status == "success"
        if name == "failure":
            return self.status == "failure"
        if name == "cancelled":
            return False
        if name == "tojson":
            return json.dumps(args[0], indent=2)
        raise ValueError(f"the test's evaluator has no function {name}()")

    def _lookup(self, path: str):
        root, *rest = path.split(".")
        if root not in self.contexts:
            raise ValueError(f"context {root!r} is not available to a composite action's steps here ({path})")
        value = self.contexts[root]
        if root == "inputs" and rest and rest[0] not in value:
            raise ValueError(f"input {rest[0]!r} is not declared in action.yml")
        if root == "steps" and rest and rest[0] not in self.contexts["_step_ids"]:
            raise ValueError(f"no step has the id {rest[0]!r}")
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        return value


_INTERP = re.compile(r"\$\{\{(.*?)\}\}", re.S)


def interpolate(text, ev: Evaluator) -> str:
    if not isinstance(text, str):
        return _text(text)
    whole = _INTERP.fullmatch(text.strip())
    if whole:
        return _text(ev.evaluate(whole.group(1)))
    return _INTERP.sub(lambda m: _text(ev.evaluate(m.group(1))), text)


def condition(text, ev: Evaluator) -> bool:
    if text is None:
        return ev.status == "success"
    text = str(text).strip()
    m = _INTERP.fullmatch(text)
    expr = m.group(1) if m else text
    if not re.search(r"\b(%s)\s*\(" % "|".join(STATUS_FUNCTIONS), expr):
        expr = f"success() && ({expr})"
    return _truthy(ev.evaluate(expr))


def parse_file_commands(path: Path) -> dict[str, str]:
    """GITHUB_OUTPUT / GITHUB_ENV syntax: `name=value` lines and `name<<DELIM` ... `DELIM` heredocs."""
    values: dict[str, str] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            body = []
            while i < len(lines) and lines[i] != delim:
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"heredoc {name!r} in {path.name} is not closed by {delim!r}"
            i += 1
            values[name] = "\n".join(body)
        else:
            name, sep, value = line.partition("=")
            assert sep, f"malformed line in {path.name}: {line!r}"
            values[name] = value
    return values


# ---------------------------------------------------------------------------------------------------------------
# The emulated runner
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StepRecord:
    id: str
    name: str
    ran: bool
    outcome: str  # success, failure, skipped
    env: dict = field(default_factory=dict)
    with_: dict = field(default_factory=dict)
    uses: str | None = None
    log: str = ""
    outputs: dict = field(default_factory=dict)


@dataclass
class ActionRun:
    steps: list[StepRecord]
    outputs: dict[str, str]
    summary: str
    workspace: Path
    temp: Path

    @property
    def failed(self) -> bool:
        return any(s.outcome == "failure" for s in self.steps)

    @property
    def log(self) -> str:
        return "\n".join(f"--- {s.name} ({s.outcome})\n{s.log}" for s in self.steps)

    def step(self, step_id: str) -> StepRecord:
        return next(s for s in self.steps if s.id == step_id)


def load_action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def run_action(tmp_path: Path, inputs: dict[str, str], env: dict[str, str] | None = None) -> ActionRun:
    """Run action.yml as a step `uses: ./` with `with: inputs` and `env: env` would, in tmp_path/workspace."""
    action = load_action()
    assert action["runs"]["using"] == "composite"
    declared = action.get("inputs") or {}
    missing = [k for k, d in declared.items() if d.get("required") and k not in inputs]
    assert not missing, f"required inputs not given: {missing}"
    # As the runner does: every given input (undeclared ones too, with a warning), then the declared defaults.
    given = {k: _text(v) for k, v in inputs.items()}
    ctx_inputs = dict(given)
    for k, d in declared.items():
        ctx_inputs.setdefault(k, _text(d.get("default", "")))

    workspace, temp, home = tmp_path / "workspace", tmp_path / "runner-temp", tmp_path / "home"
    files = tmp_path / "file-commands"
    for d in (workspace, temp, home, files):
        d.mkdir(parents=True, exist_ok=True)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("HF_", "HUGGINGFACE", "GITHUB_", "RUNNER_", "INPUT_", "COMPOSER_ACTION_"))
                and k not in ("XDG_CACHE_HOME", "PYTHONPATH")}
    base_env.update({
        "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "CI": "true",
        "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace), "GITHUB_ACTION_PATH": str(ROOT),
        "RUNNER_TEMP": str(temp), "RUNNER_OS": "Linux", "COMPOSER_ACTION_SKIP_INSTALL": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    })
    base_env.update(env or {})  # the `env:` of the workflow step that uses the action
    step_ids = [s["id"] for s in action["runs"]["steps"] if "id" in s]
    assert len(step_ids) == len(set(step_ids)), "duplicate step ids"
    steps_ctx: dict[str, dict] = {}
    records: list[StepRecord] = []
    summary_parts: list[str] = []
    status = "success"

    for n, step in enumerate(action["runs"]["steps"]):
        sid, name = step.get("id", f"__step{n}"), step.get("name", f"step {n}")
        contexts = {"inputs": ctx_inputs, "steps": steps_ctx, "env": dict(base_env), "_step_ids": set(step_ids),
                    "github": {"action_path": str(ROOT), "workspace": str(workspace)},
                    "runner": {"temp": str(temp), "os": "Linux"}}
        ev = Evaluator(contexts, status)
        if not condition(step.get("if"), ev):
            records.append(StepRecord(sid, name, False, "skipped", uses=step.get("uses")))
            steps_ctx[sid] = {"outputs": {}, "outcome": "skipped", "conclusion": "skipped"}
            continue
        step_env = {k: interpolate(v, ev) for k, v in (step.get("env") or {}).items()}
        if "uses" in step:
            assert step["uses"] in EXPECTED_USES, f"unexpected action {step['uses']}"
            assert "run" not in step
            with_ = {k: interpolate(v, ev) for k, v in (step.get("with") or {}).items()}
            records.append(StepRecord(sid, name, False, "success", step_env, with_, uses=step["uses"],
                                      log="(uses: step, not run by the test)"))
            steps_ctx[sid] = {"outputs": {}, "outcome": "success", "conclusion": "success"}
            continue

        assert step.get("shell") == "bash", f"step {name!r}: composite run steps need `shell: bash`"
        assert "${{" not in step["run"], f"step {name!r}: expressions inside a script (use env:)"
        paths = {key: files / f"{n}-{key.lower()}" for key in
                 ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY", "GITHUB_STATE")}
        for p in paths.values():
            p.write_text("")
        script = files / f"{n}-script.sh"
        script.write_text(step["run"])
        proc_env = {**base_env, **step_env, **{k: str(p) for k, p in paths.items()}}
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                              cwd=step.get("working-directory") and workspace / step["working-directory"]
                              or workspace, env=proc_env, capture_output=True, text=True, timeout=300)
        outcome = "success" if proc.returncode == 0 else "failure"
        step_outputs = parse_file_commands(paths["GITHUB_OUTPUT"])
        records.append(StepRecord(sid, name, True, outcome, step_env, log=proc.stdout + proc.stderr,
                                  outputs=step_outputs))
        steps_ctx[sid] = {"outputs": step_outputs, "outcome": outcome, "conclusion": outcome}
        summary_parts.append(paths["GITHUB_STEP_SUMMARY"].read_text())
        base_env.update(parse_file_commands(paths["GITHUB_ENV"]))
        added = [p for p in paths["GITHUB_PATH"].read_text().splitlines() if p.strip()]
        if added:
            base_env["PATH"] = os.pathsep.join([*reversed(added), base_env["PATH"]])
        if outcome == "failure" and not step.get("continue-on-error"):
            status = "failure"

    ev = Evaluator({"inputs": ctx_inputs, "steps": steps_ctx, "env": base_env, "_step_ids": set(step_ids),
                    "github": {"action_path": str(ROOT)}, "runner": {"temp": str(temp), "os": "Linux"}}, status)
    outputs = {k: interpolate(d.get("value", ""), ev) for k, d in (action.get("outputs") or {}).items()}
    return ActionRun(records, outputs, "".join(summary_parts), workspace, temp)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_plan() -> dict:
    out = subprocess.run([str(BIN / "compose"), str(RECIPE), "--dry-run", "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_action_metadata():
    action = load_action()
    assert set(action["inputs"]) == {"recipe", "output", "push-to-hub", "private", "revision", "commit-message",
                                     "seed", "model", "dry-run", "python-version"}
    assert not any("token" in name for name in action["inputs"]), "the token must come from HF_TOKEN, not an input"
    assert set(action["outputs"]) == {"repo-url", "commit", "layers", "parameters", "bytes"}
    assert action["inputs"]["recipe"]["required"] is True
    uses = [s["uses"] for s in action["runs"]["steps"] if "uses" in s]
    assert uses == ["actions/setup-python@v5", "actions/cache@v4"]
    cache = next(s for s in action["runs"]["steps"] if s.get("uses") == "actions/cache@v4")
    assert set(cache["with"]) == {"path", "key"}, "restore-keys would restore another recipe's cache"
    # No placeholder owner or tag in the usage the action's header and the README give.
    for text in (ACTION.read_text(), (ROOT / "README.md").read_text(),
                 (ROOT / "examples" / "workflows" / "compose.yml").read_text()):
        assert "<owner>" not in text and "composer@v1" not in text
    for step in action["runs"]["steps"]:
        assert "${{" not in step.get("run", ""), step["name"]
    # The example workflow uses this action, with the token from a secret through env.
    workflow = yaml.safe_load((ROOT / "examples" / "workflows" / "compose.yml").read_text())
    jobs = [s for job in workflow["jobs"].values() for s in job["steps"] if s.get("uses") == "./"]
    assert jobs and jobs[0]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert not any("hf_" in str(v) for v in jobs[0]["with"].values())


def test_evaluator_basics():
    ev = Evaluator({"inputs": {"a": "True", "b": ""}, "steps": {"s": {"outputs": {"x": "1"}, "outcome": "success"}},
                    "_step_ids": {"s"}, "env": {}}, "success")
    assert ev.evaluate("inputs.a == 'true'") is True
    assert ev.evaluate("inputs.b != ''") is False
    assert ev.evaluate("steps.s.outputs.x == '1' && steps.s.outputs.missing == ''") is True
    assert condition("always() && steps.s.outcome == 'success'", Evaluator(ev.contexts, "failure")) is True
    assert condition("steps.s.outcome == 'success'", Evaluator(ev.contexts, "failure")) is False
    with pytest.raises(ValueError):
        ev.evaluate("inputs.undeclared")
    with pytest.raises(ValueError):
        ev.evaluate("secrets.HF_TOKEN")


def test_parse_file_commands(tmp_path):
    f = tmp_path / "out"
    f.write_text("a=1\nb<<EOF_1\nline 1\nline=2\nEOF_1\nc=x=y\n")
    assert parse_file_commands(f) == {"a": "1", "b": "line 1\nline=2", "c": "x=y"}


def test_compose_tiny_recipe(tmp_path, tiny_plan):
    run = run_action(tmp_path, {"recipe": str(RECIPE), "output": "out/tiny-pro"})
    assert not run.failed, run.log
    cache_runs = "sources" not in tiny_plan  # with the CLI's `sources` (all local here) there is nothing to cache
    assert [s.outcome for s in run.steps] == ["success"] * 4 + ["success" if cache_runs else "skipped"] + \
        ["success"] * 2, run.log
    assert run.outputs == {"repo-url": "", "commit": "", "layers": "10", "parameters": str(tiny_plan["parameters"]),
                           "bytes": str(tiny_plan["output_bytes"])}
    folder = run.workspace / "out" / "tiny-pro"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "model.safetensors").stat().st_size > 0
    # The job summary: the plan's figures and its layer map.
    s = run.summary
    assert "| Layers | 10 |" in s and f"{tiny_plan['parameters']:,}" in s and f"{tiny_plan['output_bytes']:,} bytes" in s
    assert "### Layer map" in s and "| 0–3 | `../examples/tiny-llama` | 0–3 | copied |  |" in s
    assert "| 4 | `../examples/tiny-llama` | 3 | new | `mlp.down_proj.weight`, `self_attn.o_proj.weight` |" in s
    assert s.count("| new |") == 2 and "Dry run" not in s
    # The cache step (not run here) is keyed by the plan, and caches only the hub/ folder of the HF cache.
    plan = run.step("plan").outputs
    assert plan["hf-cache"] == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    assert "cache-restore-keys" not in plan
    if cache_runs:
        cache = next(r for r in run.steps if r.uses == "actions/cache@v4")
        assert cache.with_ == {"path": plan["hf-cache"], "key": plan["cache-key"]}
        assert cache.with_["key"].startswith("composer-hf-Linux-")
    setup = next(r for r in run.steps if r.uses == "actions/setup-python@v5")
    assert setup.with_ == {"python-version": "3.11"}


def test_cache_key_and_path(tmp_path, tiny_plan):
    run = run_action(tmp_path, {"recipe": str(RECIPE), "dry-run": "true"}, env={"HF_HOME": str(tmp_path / "hf")})
    assert not run.failed, run.log
    plan = run.step("plan").outputs
    assert plan["hf-cache"] == str(tmp_path / "hf" / "hub")  # never HF_HOME itself: it holds the login token
    assert plan["plan-file"] == str(run.temp / "composer-plan.json")
    if "sources" in tiny_plan:  # the CLI lists the models: all local here, so there is nothing to cache
        assert plan["cache-key"] == ""
    else:  # the recipe's text stands in for the resolved commits
        digest = hashlib.sha256(RECIPE.read_bytes()).hexdigest()
        expected = hashlib.sha256(f"recipe\n{digest}".encode()).hexdigest()[:40]
        assert plan["cache-key"] == f"composer-hf-Linux-{expected}"
    cache = next(r for r in run.steps if r.uses == "actions/cache@v4")
    assert cache.outcome == "skipped"  # a dry run fetches only configs: never save them under the full key


def _fake_compose(folder: Path, printed: dict) -> dict[str, str]:
    """A `compose` that prints `printed` whatever it is asked; returns the env putting it first on PATH."""
    folder.mkdir(parents=True)
    (folder / "compose").write_text(f"#!/bin/sh\ncat <<'JSON'\n{json.dumps(printed)}\nJSON\n")
    (folder / "compose").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_cache_key_from_hub_commits(tmp_path):
    # A multi-stage plan as the Hub-aware CLI prints it: the key is the sorted hub_id@commit list, in any order.
    keys = []
    for order in (1, -1):
        sources = [{"name": "a", "hub_id": "org/a", "commit": "1" * 40},
                   {"name": "b", "hub_id": "org/b", "commit": "2" * 40},
                   {"name": "c", "hub_id": None, "commit": None},
                   {"name": "d", "hub_id": "org/d", "commit": None}][::order]  # mapped to a folder: no download
        plan = {"layers": 2, "parameters": 5, "output_bytes": 20, "layer_map": [], "sources": sources}
        env = _fake_compose(tmp_path / f"bin{order}", {"stages": [{**plan, "stage": "s1", "sources": []}, plan]})
        run = run_action(tmp_path / f"run{order}", {"recipe": str(RECIPE)}, env=env)
        assert not run.failed, run.log
        key = run.step("plan").outputs["cache-key"]
        cache = next(r for r in run.steps if r.uses == "actions/cache@v4")
        assert cache.outcome == "success" and cache.with_["key"] == key, run.log  # the cache step would run
        keys.append(key)
        assert run.outputs["layers"] == "2" and "| `org/a` | `1111111111" in run.summary
        assert "### Stage `s1`" in run.summary
    basis = f"org/a@{'1' * 40}\norg/b@{'2' * 40}"
    assert keys[0] == keys[1] == "composer-hf-Linux-" + hashlib.sha256(basis.encode()).hexdigest()[:40]


def test_cache_key_without_sources_is_the_recipe(tmp_path):
    # A CLI without the `sources` field: the recipe's text stands in for the resolved commits.
    plan = {"layers": 2, "parameters": 5, "output_bytes": 20, "layer_map": []}
    run = run_action(tmp_path, {"recipe": str(RECIPE)}, env=_fake_compose(tmp_path / "bin", plan))
    assert not run.failed, run.log
    basis = "recipe\n" + hashlib.sha256(RECIPE.read_bytes()).hexdigest()
    key = "composer-hf-Linux-" + hashlib.sha256(basis.encode()).hexdigest()[:40]
    cache = next(r for r in run.steps if r.uses == "actions/cache@v4")
    assert cache.outcome == "success" and cache.with_["key"] == key
    assert cache.with_["path"] == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")


def test_dry_run(tmp_path, tiny_plan):
    run = run_action(tmp_path, {"recipe": str(RECIPE), "output": "out/tiny-pro", "dry-run": "TRUE",
                                "python-version": ""})
    assert not run.failed, run.log
    outcomes = {r.name: r.outcome for r in run.steps}
    assert outcomes["Compose"] == "skipped" and outcomes["Set up Python"] == "skipped"
    assert not (run.workspace / "out").exists()
    assert run.outputs["layers"] == "10" and run.outputs["parameters"] == str(tiny_plan["parameters"])
    assert run.outputs["bytes"] == str(tiny_plan["output_bytes"]) and run.outputs["repo-url"] == ""
    assert "Dry run" in run.summary and "### Layer map" in run.summary and "| Output |" not in run.summary


@pytest.mark.parametrize("inputs", [
    {"push-to-hub": FAKE_TOKEN},
    {"output": f"out/{FAKE_TOKEN}"},
    {"token": FAKE_TOKEN},  # undeclared: the runner still passes it to the action (with a warning)
    {"hf-token": f" {FAKE_TOKEN}\n"},
], ids=["declared", "inside-a-value", "undeclared-token", "undeclared-padded"])
def test_token_as_input_is_refused(tmp_path, inputs):
    run = run_action(tmp_path, {"recipe": str(RECIPE), **inputs}, env={"HF_TOKEN": FAKE_TOKEN})
    assert run.failed
    guard = run.steps[0]
    assert guard.outcome == "failure" and all(not r.ran for r in run.steps[1:]), run.log
    assert "looks like a Hugging Face token" in guard.log and "secrets.HF_TOKEN" in guard.log
    assert FAKE_TOKEN not in guard.log
    assert FAKE_TOKEN not in run.summary and not any(FAKE_TOKEN in v for v in run.outputs.values())
    assert run.summary == "" and set(run.outputs.values()) == {""}
    assert not (run.workspace / "out").exists() and not any(run.temp.iterdir())
    if "push-to-hub" in inputs or "output" in inputs:
        assert f"'{next(iter(inputs))}'" in guard.log  # names the input


def test_push_without_token_fails_early(tmp_path):
    run = run_action(tmp_path, {"recipe": str(RECIPE), "push-to-hub": "my-org/tiny-pro"})
    assert run.failed and run.steps[0].outcome == "failure"
    assert "HF_TOKEN is not set" in run.steps[0].log and "secrets.HF_TOKEN" in run.steps[0].log
    assert all(not r.ran for r in run.steps[1:]) and not (run.workspace / "out").exists()
    # A dry run only plans: it warns, and runs.
    run = run_action(tmp_path / "dry", {"recipe": str(RECIPE), "push-to-hub": "my-org/tiny-pro", "dry-run": "true"})
    assert not run.failed, run.log
    assert "::warning" in run.steps[0].log and "`my-org/tiny-pro` (not pushed)" in run.summary


def test_bad_boolean_input(tmp_path):
    run = run_action(tmp_path, {"recipe": str(RECIPE), "dry-run": "yes"})
    assert run.failed and "input 'dry-run' must be true or false" in run.steps[0].log


def test_compose_failure_still_reports_the_plan(tmp_path):
    out = tmp_path / "workspace" / "taken"
    out.mkdir(parents=True)
    (out / "file").write_text("x")  # not empty: compose refuses
    run = run_action(tmp_path, {"recipe": str(RECIPE), "output": "taken"})
    assert run.failed and run.step("compose").outcome == "failure"
    assert "not empty" in run.step("compose").log or "overwrite" in run.step("compose").log, run.log
    assert run.step("report").outcome == "success"
    assert "Compose failure" in run.summary and "### Layer map" in run.summary
    assert run.outputs["repo-url"] == "" and run.outputs["layers"] == "10"


def _push_supported() -> bool:
    help_text = subprocess.run([str(BIN / "compose"), "--help"], capture_output=True, text=True).stdout
    return "--push-to-hub" in help_text


@pytest.mark.skipif(not _push_supported(), reason="this compose has no --push-to-hub yet")
def test_push_to_fake_hub(tmp_path, tiny_plan):

    with FakeHub(tmp_path / "hub") as hub:
        env = {**hub.client_env(), "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_fake_token"}
        run = run_action(tmp_path, {"recipe": str(RECIPE), "output": "out/tiny-pro", "push-to-hub": "org/tiny-pro",
                                    "private": "true", "revision": "composed", "commit-message": "Compose $(it)"},
                         env=env)
        assert not run.failed, run.log
        sha = hub.resolve("org/tiny-pro", "composed")
        assert hub.repo("org/tiny-pro").private
        assert "model.safetensors" in hub.files("org/tiny-pro", "composed")
        assert hub.commits("org/tiny-pro", "composed")[-1].title == "Compose $(it)"  # passed as data, not run
    assert run.outputs["commit"] == sha
    assert run.outputs["repo-url"].rstrip("/").endswith("org/tiny-pro")
    assert run.outputs["layers"] == "10" and run.outputs["parameters"] == str(tiny_plan["parameters"])
    assert f"]({run.outputs['repo-url']})" in run.summary and f"`{sha[:12]}`" in run.summary
    assert "on `composed`" in run.summary
    assert "hf_fake_token" not in run.summary and "hf_fake_token" not in run.log
    assert (run.workspace / "out" / "tiny-pro" / "model.safetensors").is_file()


def _recording_compose(folder: Path, printed: dict) -> dict[str, str]:
    """A `compose` that appends its arguments (one per line, then a blank line) to folder/calls and prints
    `printed`; returns the env putting it first on PATH."""
    folder.mkdir(parents=True)
    (folder / "compose").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {folder}/calls\necho >> {folder}/calls\n"
                                    f"cat <<'JSON'\n{json.dumps(printed)}\nJSON\n")
    (folder / "compose").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_seed_and_model_inputs_reach_plan_and_compose(tmp_path):
    plan = {"layers": 2, "parameters": 5, "output_bytes": 20, "layer_map": [], "sources": []}
    env = _recording_compose(tmp_path / "bin", plan)
    models = "  org/a=/data/a  \n\norg/b=/data/with space/b\n"
    run = run_action(tmp_path / "run", {"recipe": str(RECIPE), "seed": "7", "model": models}, env=env)
    assert not run.failed, run.log
    calls = [c.split("\n") for c in (tmp_path / "bin" / "calls").read_text().strip("\n").split("\n\n")]
    assert len(calls) == 2 and "--dry-run" in calls[0] and "--dry-run" not in calls[1]
    for args in calls:
        assert args[args.index("--seed") + 1] == "7"
        assert [args[i + 1] for i, a in enumerate(args) if a == "--model"] == ["org/a=/data/a", "org/b=/data/with space/b"]


def test_model_input_maps_a_hub_id_to_a_folder(tmp_path):
    recipe = tmp_path / "workspace" / "hub-recipe.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("block_expansion: {model: org/tiny-llama, num_layers: 10}\n")
    run = run_action(tmp_path, {"recipe": "hub-recipe.yaml", "output": "out",
                                "model": f"org/tiny-llama={ROOT / 'examples' / 'tiny-llama'}"},
                     env={"HF_HUB_OFFLINE": "1"})
    assert not run.failed, run.log
    assert run.outputs["layers"] == "10" and (run.workspace / "out" / "model.safetensors").is_file()
    assert run.step("plan").outputs["cache-key"] == ""  # a local folder: nothing to download, nothing to cache


@pytest.mark.parametrize(("inputs", "message"), [
    ({"seed": "-1"}, "input 'seed' must be a whole number"),
    ({"seed": "1e3"}, "input 'seed' must be a whole number"),
    ({"model": "org/a=/x\n/just/a/path"}, "input 'model': '/just/a/path' is not NAME=PATH"),
], ids=["negative-seed", "float-seed", "model-without-name"])
def test_bad_seed_or_model_input(tmp_path, inputs, message):
    run = run_action(tmp_path, {"recipe": str(RECIPE), **inputs})
    assert run.failed and run.steps[0].outcome == "failure" and message in run.steps[0].log, run.log
    assert all(not r.ran for r in run.steps[1:])
