"""Models by Hub id, dry runs from headers, pickle weights and pushes: the real CLI and huggingface_hub client against
the fake Hub of hubserver.py on loopback."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import constants

from composer.cli import main, push
from hubserver import FakeHub, use_fake_hub
from tinymodels import load_state_dict

# huggingface_hub 2.4 PUTs LFS objects with httpx2's deprecated data=<file> argument.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_composerSECRETtoken0123456789abcdef"  # distinctive, to grep every output for
EXPAND = "block_expansion: {{model: {model}, num_layers: 6}}\n"
STACK = "merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: [0, 4]\n"
LINEAR = ("merge_method: linear\ndtype: float32\nparameters: {{weight: 0.5}}\n"
          "models:\n  - model: {a}\n  - model: {b}\n")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(tmp_path / "hubdata") as hub:
        hub.allowed_tokens[TOKEN] = "tester"
        use_fake_hub(monkeypatch, hub, tmp_path / "hf")
        yield hub


def publish(hub: FakeHub, repo_id: str, folder: Path, **kw) -> str:
    """Put every file of a local model folder in a Hub repo; return the commit."""
    return hub.add_repo(repo_id, {p.name: p for p in folder.iterdir() if p.is_file()}, **kw)


def compose(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def plan_json(recipe: Path, *args: str) -> dict:
    code, out, err = compose(recipe, "--dry-run", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def fails(recipe: Path, *args: str) -> str:
    """A clean failure: exit 1, one line on stderr, no traceback."""
    code, out, err = compose(recipe, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def weight_gets(hub: FakeHub) -> list:
    return [r for r in hub.requests if r.route == "resolve" and r.method == "GET"
            and r.path.endswith((".safetensors", ".bin"))]


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


# -- resolution ---------------------------------------------------------------------------------------------------------

def test_resolution_by_branch_tag_and_sha_names_the_commit(hub, models, write_recipe):
    first = publish(hub, "org/llama", models["llama"], card={"license": "apache-2.0"})
    hub.add_tag("org/llama", "v1")
    second = hub.add_repo("org/llama", {"notes.txt": b"later"})
    dev = hub.add_repo("org/llama", {"dev.txt": b"x"}, revision="dev")
    cases = {"": second, "@v1": first, "@dev": dev, f"@{first}": first, f"@{first[:10]}": first}
    for suffix, commit in cases.items():
        name = f"org/llama{suffix}"
        plan = plan_json(write_recipe(EXPAND.format(model=name)))
        assert plan["sources"] == [{"name": name, "hub_id": "org/llama", "revision": suffix[1:] or None,
                                    "commit": commit}]
        assert plan["layers"] == 6
    code, text, _ = compose(write_recipe(EXPAND.format(model="org/llama@v1")), "--dry-run")
    assert code == 0 and f"hub model:   org/llama@v1 at commit {first}" in text


def test_dry_run_reads_only_config_tokenizer_and_headers(hub, models, write_recipe, tmp_path):
    for repo, folder in (("org/mistral", models["mistral"]), ("org/qwen2", models["qwen2-single"])):
        publish(hub, repo, folder)
        remote = plan_json(write_recipe(EXPAND.format(model=repo), "hub.yaml"))
        local = plan_json(write_recipe(EXPAND.format(model=folder), "local.yaml"))
        for key in ("layers", "layer_map", "parameters", "output_bytes", "peak_memory_bytes", "tensors", "shards"):
            if key == "layer_map":
                for r in remote[key]:
                    r["model"] = str(folder)
            assert remote[key] == local[key], key
    gets = weight_gets(hub)
    assert gets and all(r.range == "bytes=0-100000" and r.status == 206 for r in gets)  # headers only
    shards = [p.name for p in models["mistral"].glob("*.safetensors")]
    assert sorted(r.path.rsplit("/", 1)[1] for r in gets if "mistral" in r.path) == sorted(shards)
    cached = {p.name for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() or p.is_symlink()}
    assert not any(n.endswith(".safetensors") for n in cached)
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= cached


def test_compose_from_hub_equals_local_and_card_names_hub_ids(hub, models, write_recipe, tmp_path):
    sha = publish(hub, "org/llama", models["llama"], card={"license": "llama2", "tags": ["x"]})
    code, out, err = compose(write_recipe(EXPAND.format(model="org/llama")), "-o", tmp_path / "out", "-q", "--json")
    assert code == 0, err
    assert json.loads(out)["sources"] == [{"name": "org/llama", "hub_id": "org/llama", "revision": None,
                                           "commit": sha}]
    code, _, err = compose(write_recipe(EXPAND.format(model=models["llama"]), "l.yaml"), "-o", tmp_path / "ref", "-q")
    assert code == 0, err
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref/model.safetensors").read_bytes()
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (models["llama"] / name).read_bytes()

    card = (tmp_path / "out/README.md").read_text()
    assert front_matter(card) == {"base_model": "org/llama", "base_model_relation": "finetune", "license": "llama2",
                                  "tags": ["composer", "block-expansion"], "library_name": "transformers"}
    assert f"| `org/llama` | main | `{sha}` | safetensors |" in card
    prov = json.loads((tmp_path / "out/composer_provenance.json").read_text())
    assert prov["hub_sources"] == [{"hub_id": "org/llama", "revision": None, "commit": sha,
                                    "license": {"license": "llama2"}, "weights": "safetensors"}]
    for file in (tmp_path / "out").iterdir():  # no cache or local paths anywhere in the output
        text = file.read_bytes()
        assert str(tmp_path).encode() not in text and b"snapshots" not in text, file.name


def test_merge_of_hub_and_local_models(hub, models, write_recipe, tmp_path):
    sha = publish(hub, "org/a", models["llama"], card={"license": "mit"})
    recipe = write_recipe(LINEAR.format(a="org/a", b=models["llama-b"]) + "base_model: org/a\n")
    code, _, err = compose(recipe, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    front = front_matter((tmp_path / "out/README.md").read_text())
    assert front["base_model"] == "org/a" and front["base_model_relation"] == "merge" and front["license"] == "mit"
    assert "merge" in front["tags"]
    publish(hub, "org/b", models["llama-b"])
    recipe = write_recipe(LINEAR.format(a="org/a", b="org/b@main"), "two.yaml")
    assert compose(recipe, "-o", tmp_path / "two", "-q")[0] == 0
    front = front_matter((tmp_path / "two/README.md").read_text())
    assert front["base_model"] == ["org/a", "org/b"] and front["base_model_relation"] == "merge"
    assert (tmp_path / "two/model.safetensors").is_file() and sha


def test_local_models_never_appear_in_base_model(models, write_recipe, tmp_path):
    code, _, err = compose(write_recipe(EXPAND.format(model=models["llama"])), "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert "base_model" not in front_matter((tmp_path / "out/README.md").read_text())
    # A local copy named by its Hub id (--model) is lineage without a known commit.
    recipe = write_recipe(EXPAND.format(model="org/llama"), "named.yaml")
    code, out, err = compose(recipe, "-o", tmp_path / "named", "-q", "--json", "--model", f"org/llama={models['llama']}")
    assert code == 0, err
    assert json.loads(out)["sources"][0] == {"name": "org/llama", "hub_id": "org/llama", "revision": None,
                                             "commit": None}
    assert front_matter((tmp_path / "named/README.md").read_text())["base_model"] == "org/llama"


def test_stages_carry_hub_lineage(hub, models, write_recipe, tmp_path):
    sha = publish(hub, "org/llama", models["llama"])
    recipe = write_recipe(f"name: up\n{STACK.format(model='org/llama')}---\n{EXPAND.format(model='up')}")
    code, _, err = compose(recipe, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    front = front_matter((tmp_path / "out/README.md").read_text())
    assert front["base_model"] == "org/llama" and front["base_model_relation"] == "finetune"
    assert json.loads((tmp_path / "out/composer_provenance.json").read_text())["hub_sources"][0]["commit"] == sha


# -- offline ------------------------------------------------------------------------------------------------------------

def test_offline_with_warm_cache_and_cold_cache(hub, models, write_recipe, tmp_path, monkeypatch):
    sha = publish(hub, "org/llama", models["llama"])
    publish(hub, "org/other", models["llama-b"])
    recipe = write_recipe(EXPAND.format(model="org/llama"))
    assert compose(recipe, "-o", tmp_path / "online", "-q")[0] == 0
    hub.clear_requests()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert plan_json(recipe)["sources"][0]["commit"] == sha
    code, _, err = compose(recipe, "-o", tmp_path / "offline", "-q")
    assert code == 0, err
    assert hub.requests == []
    assert (tmp_path / "offline/model.safetensors").read_bytes() == (tmp_path / "online/model.safetensors").read_bytes()
    line = fails(write_recipe(EXPAND.format(model="org/other"), "cold.yaml"), "--dry-run")
    assert "no local folder org/other, and HF_HUB_OFFLINE is set and org/other@main is not in the Hub cache" in line


def test_offline_subprocess_honours_environment(hub, models, write_recipe, tmp_path):
    sha = publish(hub, "org/llama", models["llama"], gated=True)
    recipe = write_recipe(EXPAND.format(model="org/llama"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hub.client_env(), HF_HOME=str(tmp_path / "sub-hf"), HF_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "composer.cli", str(recipe), "-q"]
    done = subprocess.run([*cmd, "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert hub.tokens_seen == {TOKEN} and (tmp_path / "sub-hf/hub/models--org--llama/snapshots" / sha).is_dir()
    hub.clear_requests()
    env.pop("HF_TOKEN")
    done = subprocess.run([*cmd, "--dry-run", "--json"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sources"][0]["commit"] == sha and hub.requests == []
    cold = subprocess.run(cmd + ["--dry-run"], env={**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "cold")},
                          capture_output=True, text=True, timeout=120)
    assert cold.returncode == 1 and "Traceback" not in cold.stderr
    assert "HF_HUB_OFFLINE is set and org/llama@main is not in the Hub cache" in cold.stderr


# -- errors -------------------------------------------------------------------------------------------------------------

def test_clear_errors(hub, models, write_recipe, tmp_path, monkeypatch):
    publish(hub, "org/llama", models["llama"])
    publish(hub, "org/gated", models["llama"], gated=True)
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    hub.add_repo("org/gguf", {"config.json": (models["llama"] / "config.json").read_bytes(), "model.gguf": b"GGUF"})

    def error(model: str) -> str:
        return fails(write_recipe(EXPAND.format(model=model)), "--dry-run")

    assert "neither a local folder nor a Hub repo this client can see (no repo org/missing" in error("org/missing")
    assert "or a private one): check the name, or set HF_TOKEN" in error("org/private")
    assert "org/gated is gated and no token is set: accept its conditions" in error("org/gated")
    assert "org/llama has no revision 'v9': use a branch, a tag or a commit sha" in error("org/llama@v9")
    assert "org/gguf at commit" in error("org/gguf") and "has no safetensors weights" in error("org/gguf")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert plan_json(write_recipe(EXPAND.format(model="org/gated")))["layers"] == 6
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token_42")
    line = error("org/llama")
    assert "rejected the token" in line and "hf_not_a_valid_token_42" not in line


# -- pickles ------------------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def pickle_repo(folder: Path, tmp_path: Path, shards: int = 1, extra: dict | None = None) -> dict[str, Path]:
    """A model's files with its weights as pytorch_model*.bin (torch.save's zip format), as old Hub repos ship."""
    state = load_state_dict(folder)
    files = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith("model")}
    names = sorted(state)
    if shards == 1:
        torch.save({**state, **(extra or {})}, tmp_path / "pytorch_model.bin")
        return {**files, "pytorch_model.bin": tmp_path / "pytorch_model.bin"}
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, tmp_path / name)
        files[name] = tmp_path / name
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {**files, "pytorch_model.bin.index.json": tmp_path / "pytorch_model.bin.index.json"}


@pytest.mark.parametrize("shards", [1, 3])
def test_pickle_only_repo_loads_with_weights_only(hub, models, write_recipe, tmp_path, monkeypatch, shards):
    sha = hub.add_repo("org/old", pickle_repo(models["mistral"], tmp_path, shards))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    recipe = write_recipe(STACK.format(model="org/old"))
    dry = plan_json(recipe)
    assert any("read from pickle files" in n and "loaded with weights_only=True" in n for n in dry["notes"])
    code, out, err = compose(recipe, "-o", tmp_path / "out", "-q", "--json")
    assert code == 0, err
    assert any("loaded with weights_only=True" in n for n in json.loads(out)["notes"])
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)
    assert len(calls) == shards  # converted once per commit: the real run reused the dry run's conversion
    got, want = load_state_dict(tmp_path / "out"), load_state_dict(models["mistral"])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    converted = tmp_path / "hf/composer/converted/org--old" / sha
    assert sorted(p.name for p in converted.iterdir()) == (
        ["model.safetensors"] if shards == 1 else
        ["model.safetensors.index.json", *(f"pytorch_model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3))])
    card = (tmp_path / "out/README.md").read_text()
    assert "pickle (read with weights_only=True)" in card


def test_malicious_pickle_is_refused(hub, models, write_recipe, tmp_path):
    marker = tmp_path / "pwned"
    hub.add_repo("org/evil", pickle_repo(models["llama"], tmp_path, extra={"evil": Payload(marker)}))
    line = fails(write_recipe(STACK.format(model="org/evil")), "-o", tmp_path / "out")
    assert "refused to load pytorch_model.bin: it holds more than tensors" in line and "weights_only=True" in line
    assert "unsupported GLOBAL posix.mkdir" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- push ---------------------------------------------------------------------------------------------------------------

def test_compose_and_push_without_leaking_the_token(hub, models, write_recipe, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    sha = publish(hub, "org/llama", models["llama"], card={"license": "mit"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    code, stdout, stderr = compose(write_recipe(EXPAND.format(model="org/llama")), "-o", out, "--json",
                                   "--push-to-hub", "me/expanded", "--private", "--commit-message", "LLaMA Pro 6")
    assert code == 0, stderr
    result = json.loads(stdout)
    head = hub.resolve("me/expanded")
    assert result["hub"] == {"repo_url": f"{hub.url}/me/expanded", "commit": head, "revision": "main"}
    assert result["sources"] == [{"name": "org/llama", "hub_id": "org/llama", "revision": None, "commit": sha}]
    assert hub.repo("me/expanded").private and hub.commits("me/expanded")[-1].title == "LLaMA Pro 6"
    files = hub.files("me/expanded")
    assert files.pop(".gitattributes") and files == {p.name: p.read_bytes() for p in out.iterdir()}
    front = front_matter(files["README.md"].decode())
    assert front["base_model"] == "org/llama" and front["license"] == "mit"
    assert TOKEN in hub.tokens_seen

    texts = {"stdout": stdout, "stderr": stderr, "log": caplog.text,
             **{str(p): p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()},
             **{f"hub:{k}": v.decode("latin-1") for k, v in files.items()}}
    assert not [where for where, text in texts.items() if TOKEN in text]
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]


def test_push_to_a_branch_and_push_an_existing_folder(hub, models, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    assert compose(write_recipe(EXPAND.format(model=models["llama"])), "-o", out, "-q")[0] == 0
    result = CliRunner().invoke(push, [str(out), "me/model", "--revision", "v2-branch", "--json"])
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)["hub"]
    assert pushed["revision"] == "v2-branch" and pushed["commit"] == hub.resolve("me/model", "v2-branch")
    assert "model.safetensors" in hub.files("me/model", "v2-branch") and "model.safetensors" not in hub.files("me/model")
    hub.clear_requests()
    again = CliRunner().invoke(push, [str(out), "me/model", "--revision", "v2-branch", "-q"])
    assert again.exit_code == 0 and [r for r in hub.requests if r.route == "lfs_upload"] == []


def test_push_resumes_after_an_interruption(hub, models, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    recipe = write_recipe(EXPAND.format(model=models["llama"]))
    assert compose(recipe, "--dry-run", "--shard-size", "300KB")[0] == 0
    # Compose first, to learn the shards' object ids, then fail the upload of one of them in a fresh run.
    assert compose(recipe, "-o", tmp_path / "probe", "-q", "--shard-size", "300KB")[0] == 0
    shards = sorted((tmp_path / "probe").glob("*.safetensors"))
    assert len(shards) >= 3
    victim = hashlib.sha256(shards[1].read_bytes()).hexdigest()
    hub.inject_failure("lfs_upload", match=victim, status=400)
    line = fails(recipe, "-o", out, "-q", "--shard-size", "300KB", "--push-to-hub", "me/big")
    assert "upload to me/big was interrupted" in line and f"run `compose-push {out} me/big`" in line
    assert len(hub.commits("me/big")) == 1  # only the repo's initial commit
    oids = {hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.safetensors")}
    # The server logs a request after answering it: let the last answers of the failed run be logged first.
    deadline = time.monotonic() + 10
    while (len([r for r in hub.requests if r.route == "lfs_upload"]) != len(hub.lfs_objects("me/big")) + 1
           and time.monotonic() < deadline):
        time.sleep(0.05)
    arrived = hub.lfs_objects("me/big")
    assert victim not in arrived and arrived <= oids
    hub.clear_requests()
    result = CliRunner().invoke(push, [str(out), "me/big"])
    assert result.exit_code == 0, result.output
    resent = [r.path.rsplit("/", 1)[1] for r in hub.requests if r.route == "lfs_upload"]
    assert sorted(resent) == sorted(oids - arrived) and victim in resent  # what arrived is not sent again
    files = hub.files("me/big")
    assert files.pop(".gitattributes") and files == {p.name: p.read_bytes() for p in out.iterdir()}


def test_push_refused_before_composing(hub, models, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(EXPAND.format(model=models["llama"]))
    line = fails(recipe, "-o", tmp_path / "out", "--push-to-hub", "me/x")
    assert "pushing needs a Hub token with write access: set HF_TOKEN" in line and not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_for_push_77")
    line = fails(recipe, "-o", tmp_path / "out", "--push-to-hub", "me/x")
    assert "rejected the token" in line and "hf_wrong_token_for_push_77" not in line
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "cannot push while HF_HUB_OFFLINE is set" in fails(recipe, "-o", tmp_path / "out", "--push-to-hub", "me/x")
    assert "is not a Hub repo id" in fails(recipe, "-o", tmp_path / "out", "--push-to-hub", "me/x@dev")
    code, _, err = compose(recipe, "--dry-run", "--push-to-hub", "me/x")
    assert code == 2 and "drop --dry-run" in err


def test_compose_push_console_script(hub, models, write_recipe, tmp_path):
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["compose-push"] == "composer.cli:push"
    out = tmp_path / "out"
    assert compose(write_recipe(EXPAND.format(model=models["llama"])), "-o", out, "-q")[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hub.client_env(), HF_HOME=str(tmp_path / "sub-hf"), HF_TOKEN=TOKEN)
    cmd = [sys.executable, "-c", "from composer.cli import push; push()", str(out), "me/sub", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hub"]["commit"] == hub.resolve("me/sub")
    assert TOKEN not in done.stdout + done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([*cmd[:3], str(empty), "me/sub"], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "is not a composed model folder" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_a_lora_source_from_the_hub_with_revisions_on_both_parts(hub, models, write_recipe, tmp_path):
    """`org/model@rev+org/adapter@rev`: each part resolved at its own revision, the adapter's config and weights
    downloaded; the output equals the same recipe over the local folders, and the card lists both repos."""
    peft = pytest.importorskip("peft")
    from test_lora import make_adapter

    adapter = make_adapter(models["llama"], tmp_path / "ad", seed=3, targets=["q_proj"], save=())
    publish(hub, "org/llama", models["llama"])
    hub.add_tag("org/llama", "v1")
    publish(hub, "org/lora", adapter, revision="exp")
    assert peft is not None
    code, _, err = compose(write_recipe("merge_method: passthrough\nmodels: [{model: org/llama@v1+org/lora@exp}]\n"),
                           "-o", tmp_path / "out", "-q")
    assert code == 0, err
    local = write_recipe(f"merge_method: passthrough\nmodels: [{{model: {models['llama']}+{adapter}}}]\n", "local.yaml")
    code, _, err = compose(local, "-o", tmp_path / "local", "-q")
    assert code == 0, err
    ours, want = load_state_dict(tmp_path / "out"), load_state_dict(tmp_path / "local")
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in ours)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           load_state_dict(models["llama"])["model.layers.0.self_attn.q_proj.weight"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "org/llama" in card and "org/lora" in card
    missing = write_recipe("merge_method: passthrough\nmodels: [{model: org/llama+org/nolora}]\n", "missing.yaml")
    assert "org/nolora" in fails(missing, "-o", tmp_path / "m")
