"""The Python API: compose() takes a recipe as a path, a dict or YAML text, runs every stage as the CLI does and
returns a ComposeResult; push() uploads as compose-push does; the package ships its type marker and one version."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import composer
from composer import ComposeResult, PushResult, RecipeError
from composer.cli import main
from conftest import tree_digest
from hubserver import FakeHub, use_fake_hub
from test_stages import two_stages

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def expansion(model: Path) -> str:
    return f"block_expansion: {{model: {model}, num_layers: 6}}\n"


def test_compose_takes_a_path_a_dict_or_text(models, tmp_path):
    text = expansion(models["llama"])
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    results = [composer.compose(path, tmp_path / "from-path"), composer.compose(str(path), tmp_path / "from-str"),
               composer.compose(yaml.safe_load(text), tmp_path / "from-dict"),
               composer.compose(text, tmp_path / "from-text")]
    digests = [tree_digest(r.path) for r in results]
    assert digests[0] == digests[1]
    # Text: the same folder, but the card's title cannot be the recipe file's name.
    assert {**digests[3], "README.md": ""} == {**digests[0], "README.md": ""}
    assert (results[3] / "README.md").read_text().split("\n# ", 1)[1].startswith("composed model")
    # A dict is written back as YAML: the same model, the recipe file holds that YAML.
    assert {k: v for k, v in digests[2].items() if k not in ("composer_recipe.yaml", "README.md")} == \
        {k: v for k, v in digests[0].items() if k not in ("composer_recipe.yaml", "README.md")}
    assert yaml.safe_load((results[2] / "composer_recipe.yaml").read_text()) == yaml.safe_load(text)
    cli = tmp_path / "cli"
    assert CliRunner().invoke(main, [str(path), str(cli), "-q"]).exit_code == 0
    assert tree_digest(cli) == digests[0]


def test_result_figures(models, tmp_path):
    result = composer.compose(expansion(models["llama"]), tmp_path / "out")
    assert isinstance(result, ComposeResult) and result.path == (tmp_path / "out").resolve()
    assert os.fspath(result) == str(result.path) and Path(result) == result.path  # the Path of 0.1.0, as before
    assert (result / "config.json").is_file()
    assert result.new_layers == composer.new_layers(result.path) == [2, 5]
    assert result.layers == 6 and result.shards == 1 == len(list(result.path.glob("*.safetensors")))
    assert result.bytes == (result / "model.safetensors").stat().st_size
    assert result.tensors == len(result.plan.tensors) and result.parameters == result.plan.num_parameters
    assert result.plans == (result.plan,) and result.reused == ()
    with pytest.raises(AttributeError):
        result.path = tmp_path  # frozen


def test_multi_document_recipe_runs_every_stage(models, tmp_path):
    text = two_stages(models["llama"], models["llama-b"])
    out = tmp_path / "final"
    result = composer.compose(text, out)
    assert [p.operation for p in result.plans] == ["linear", "block-expansion"]
    assert (tmp_path / "final.stages" / "average" / "model.safetensors").is_file()
    assert result.new_layers == [2, 5]
    again = composer.compose(text, out, overwrite=True)  # the stage is reused, as the CLI reuses it
    assert again.reused == ("average",) and len(again.plans) == 1
    assert tree_digest(again.path) == tree_digest(result.path)


def test_output_switches_and_crimes(models, tmp_path):
    result = composer.compose(expansion(models["llama"]), tmp_path / "out", copy_tokenizer=False,
                              write_model_card=False, jobs=1)
    files = {p.name for p in result.path.iterdir()}
    assert "README.md" not in files and "tokenizer.json" not in files and "composer_provenance.json" in files
    mixed = {"merge_method": "linear", "models": [{"model": str(models["llama"])}, {"model": str(models["qwen2"])}],
             "parameters": {"weight": 0.5}}
    with pytest.raises(composer.PlanError, match="--allow-crimes"):
        composer.compose(mixed, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert composer.compose(mixed, tmp_path / "crimes", allow_crimes=True).layers == 4


def test_bad_recipes(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        composer.compose(str(tmp_path / "missing.yaml"), tmp_path / "out")
    with pytest.raises(RecipeError, match=r"<recipe>:1: dtpye: unknown key"):
        composer.compose("dtpye: bfloat16\nblock_expansion: {model: m, every: 2}\n", tmp_path / "out")
    with pytest.raises(RecipeError, match="not int"):
        composer.compose(3, tmp_path / "out")
    with pytest.raises(ValueError, match="jobs=0"):
        composer.compose({"block_expansion": {"model": "m", "every": 2}}, tmp_path / "out", jobs=0)


def test_plan_recipe_takes_text(models):
    plan = composer.plan_recipe(expansion(models["llama"]))
    assert len(plan.layers) == 6 and plan.recipe_path == ""


def test_push(models, tmp_path, monkeypatch):
    out = composer.compose(expansion(models["llama"]), tmp_path / "out")
    with FakeHub(tmp_path / "hubdata") as hub:
        hub.allowed_tokens["hf_apitoken0123456789abcdefghij"] = "tester"
        use_fake_hub(monkeypatch, hub, tmp_path / "hf")
        monkeypatch.setenv("HF_TOKEN", "hf_apitoken0123456789abcdefghij")
        pushed = composer.push(out, "me/expanded", revision="v1", commit_message="from the API")
        assert isinstance(pushed, PushResult) and pushed.revision == "v1"
        assert pushed.commit == hub.resolve("me/expanded", "v1")
        assert hub.commits("me/expanded", "v1")[-1].title == "from the API"
        assert "model.safetensors" in hub.files("me/expanded", "v1")
        with pytest.raises(composer.ComposerError, match="not a composed model folder"):
            composer.push(tmp_path, "me/expanded")


def test_packaging_and_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == composer.__version__
    assert (ROOT / "composer" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["composer"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    assert sections[0] == "Unreleased" and sections[1] == composer.__version__
