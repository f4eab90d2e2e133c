"""Hostile and broken inputs: each is refused with one line naming the problem and the fix, quickly, with no
traceback, nothing finished-looking in the output and the inputs unchanged."""
from __future__ import annotations

import time

import pytest

from conftest import tree_digest
from test_errors import fails, passthrough


def refused(tmp_path, text: str, *args: str, seconds: float = 20) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    start = time.monotonic()
    line = fails(recipe, *args)
    assert time.monotonic() - start < seconds, "refused, but slowly"
    return line


# -- 1-4: the recipe's YAML ------------------------------------------------------------------------------------------

def _laughs(model) -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) values once expanded, 90 in the text."""
    lines = ["merge_method: linear", f"models: [{{model: {model}}}, {{model: {model}}}]", "parameters:",
             "  weight: 0.5", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_refused_before_expanding(models, tmp_path):
    line = refused(tmp_path, _laughs(models["llama"]), seconds=10)
    assert "expands to more than 1,000,000 values (aliases included)" in line


def test_recursive_alias_refused(models, tmp_path):
    text = f"merge_method: linear\nmodels: [{{model: {models['llama']}}}]\nparameters:\n  weight: &w [1, *w]\n"
    assert "recipe.yaml:4: alias *w refers to a value that contains it" in refused(tmp_path, text)


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deep_nesting_refused_without_recursion_error(models, tmp_path, opening):
    closing = "]" if opening == "[" else "}"
    text = passthrough(models["llama"]) + "parameters: {scale: " + opening * 5000 + "1" + closing * 5000 + "}\n"
    line = refused(tmp_path, text)
    assert "recipe.yaml:6: nested more than 64 levels deep" in line and "RecursionError" not in line


def test_absurd_layer_range_refused_quickly(models, tmp_path):
    line = refused(tmp_path, passthrough(models["llama"], f"[0, {10**12}]"), seconds=10)
    assert "layer_range [0, 1000000000000] is out of range" in line and "use an end of at most 4" in line


def test_million_entry_gradient_refused_quickly(models, tmp_path):
    m = models["llama"]
    text = (f"merge_method: linear\nmodels: [{{model: {m}}}, {{model: {m}}}]\nparameters:\n  weight: ["
            + ", ".join(["0.5"] * 1_000_000) + "]\n")
    assert "recipe.yaml:4: a list with more than 10,000 entries" in refused(tmp_path, text, seconds=10)


@pytest.mark.parametrize(("text", "expected"), [
    ("1: x\n", "recipe.yaml:1: key 1 is a YAML int, not a name"),
    ("? [a]\n: x\n", "recipe.yaml:1: a key is a list, not a name"),
    ("? {a: 1}\n: x\n", "recipe.yaml:1: a key is a mapping, not a name"),
    ("null: x\n", "recipe.yaml:1: key null is a YAML null, not a name"),
    ("models: [{model: M, parameters: {true: 1}}]\n", "recipe.yaml:2: key true is a YAML bool, not a name"),
    ("", "recipe.yaml: the recipe is empty"),
    ("# nothing but a comment\n---\n", "recipe.yaml: the recipe is empty"),
    ("- merge_method: passthrough\n- models: [{model: M}]\n", "a recipe is a YAML mapping"),
])
def test_keys_that_are_not_names_and_empty_or_list_recipes(models, tmp_path, text, expected):
    body = "merge_method: passthrough\n" + text if text.startswith("models") else text
    assert expected in refused(tmp_path, body.replace(" M", f" {models['llama']}"))


# -- 5: stages that use each other -----------------------------------------------------------------------------------

def _stage(name: str | None, model: str) -> str:
    return (f"name: {name}\n" if name else "") + f"merge_method: passthrough\nmodels: [{{model: {model}}}]\n"


def test_stages_in_a_cycle_refused(models, tmp_path):
    text = "---\n".join([_stage("a", "b"), _stage("b", "a"), _stage(None, "b")])
    line = refused(tmp_path, text)
    assert "stage 'a' uses stage 'b', which comes after it" in line and "move 'b' up" in line


def test_stage_using_itself_refused(models, tmp_path):
    text = "---\n".join([_stage("a", "a"), _stage(None, "a")])
    assert "stage 'a' uses itself as a model" in refused(tmp_path, text)
    out = tmp_path / "out"
    assert "stage 'a' uses itself" in fails(tmp_path / "recipe.yaml", out=out)
    assert not out.exists() and not (tmp_path / "out.stages").exists()
