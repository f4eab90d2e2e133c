"""The fake Hub of hubserver.py, driven by the real huggingface_hub client over loopback."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, get_session, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

from hubserver import FakeHub, git_blob_sha1, use_fake_hub

# huggingface_hub 2.4 PUTs LFS objects with httpx2's deprecated data=<file> argument.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_fake_token"  # the default token of FakeHub, owned by user "tester"
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(tmp_path / "hubdata") as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf")
        yield hub


def weights(path: Path, seed: int = 0, rows: int = 64) -> Path:
    """A real safetensors file; 64 x 512 float32 = 128 KiB, more than the 100 kB the client reads for headers."""
    gen = torch.Generator().manual_seed(seed)
    save_file({f"layer{seed}.weight": torch.randn(rows, 512, generator=gen), f"layer{seed}.bias": torch.zeros(512)},
              str(path))
    return path


def sharded_files(tmp_path: Path) -> dict[str, Path | bytes]:
    shards = {f"model-0000{i}-of-00002.safetensors": weights(tmp_path / f"shard{i}.safetensors", seed=i)
              for i in (1, 2)}
    weight_map = {f"layer{i}.{kind}": name for i, name in enumerate(shards, 1) for kind in ("weight", "bias")}
    index = {"metadata": {"total_size": 2 * (64 * 512 + 512) * 4}, "weight_map": weight_map}
    return {**shards, "model.safetensors.index.json": json.dumps(index).encode(), "config.json": CONFIG}


def weight_reads(hub: FakeHub) -> list:
    return [r for r in hub.requests if r.route == "resolve" and r.path.endswith(".safetensors") and r.method == "GET"]


def test_model_info_by_branch_tag_and_sha(hub, tmp_path):
    api = HfApi()
    first = hub.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": weights(tmp_path / "w.safetensors")},
                         card={"license": "mit", "tags": ["composer"], "library_name": "transformers"})
    hub.add_tag("org/tiny", "v1")
    second = hub.add_repo("org/tiny", {"extra.txt": b"more"}, message="Add extra")
    feature = hub.add_repo("org/tiny", {"feature.txt": b"x"}, revision="feature/x")

    info = api.model_info("org/tiny")
    assert (info.id, info.sha, info.private, info.gated) == ("org/tiny", second, False, False)
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "README.md", "config.json", "model.safetensors",
                                                    "extra.txt"}
    assert info.card_data.license == "mit" and info.tags == ["composer"] and info.library_name == "transformers"
    assert info.config == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert info.safetensors.total == 64 * 512 + 512 and info.safetensors.parameters == {"F32": 64 * 512 + 512}
    assert info.siblings[0].size is None  # sizes only come with files_metadata=True, as on the Hub

    assert api.model_info("org/tiny", revision="v1").sha == first
    assert api.model_info("org/tiny", revision=first).sha == first
    assert api.model_info("org/tiny", revision=first[:10]).sha == first
    assert api.model_info("org/tiny", revision="feature/x").sha == feature  # sent as feature%2Fx
    assert "extra.txt" not in {s.rfilename for s in api.model_info("org/tiny", revision="v1").siblings}

    detailed = {s.rfilename: s for s in api.model_info("org/tiny", files_metadata=True).siblings}
    blob = (tmp_path / "w.safetensors").read_bytes()
    assert detailed["model.safetensors"].size == len(blob)
    assert detailed["model.safetensors"].lfs.sha256 == hashlib.sha256(blob).hexdigest()
    assert detailed["config.json"].lfs is None and detailed["config.json"].size == len(CONFIG)

    refs = api.list_repo_refs("org/tiny")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "feature/x": feature}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first}
    assert [c.title for c in api.list_repo_commits("org/tiny")] == ["Add extra", "Upload files", "initial commit"]


def test_hf_hub_download_bytes_and_commit_in_cache_path(hub, tmp_path):
    blob = weights(tmp_path / "w.safetensors").read_bytes()
    first = hub.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": blob, "sub/notes.txt": b"v1"})
    second = hub.add_repo("org/tiny", {"sub/notes.txt": b"v2"})

    path = Path(hf_hub_download("org/tiny", "model.safetensors"))
    assert path.read_bytes() == blob
    assert path.parent.name == second and path.parent.parent.name == "snapshots"
    assert path.resolve().name == hashlib.sha256(blob).hexdigest()  # LFS blobs are cached under their sha256
    assert (Path(constants.HF_HUB_CACHE) / "models--org--tiny" / "refs" / "main").read_text() == second

    assert Path(hf_hub_download("org/tiny", "sub/notes.txt")).read_bytes() == b"v2"
    old = Path(hf_hub_download("org/tiny", "notes.txt", subfolder="sub", revision=first))
    assert old.read_bytes() == b"v1" and old.parent.parent.name == first

    # The endpoint= argument works too, whatever constants.ENDPOINT says.
    elsewhere = hf_hub_download("org/tiny", "config.json", endpoint=hub.url, cache_dir=tmp_path / "other")
    assert Path(elsewhere).read_bytes() == CONFIG

    gets = [r for r in hub.requests if r.route == "resolve"]
    assert {r.method for r in gets} == {"HEAD", "GET"} and all(r.status == 200 for r in gets)


def test_snapshot_download_with_allow_patterns(hub, tmp_path):
    files = sharded_files(tmp_path)
    sha = hub.add_repo("org/sharded", {**files, "tokenizer.json": b"{}", "docs/usage.md": b"# usage"})

    folder = Path(snapshot_download("org/sharded", allow_patterns=["*.json", "docs/*"]))
    assert folder.name == sha
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == ["config.json", "docs/usage.md", "model.safetensors.index.json", "tokenizer.json"]
    assert weight_reads(hub) == []

    full = Path(snapshot_download("org/sharded"))
    for name, content in files.items():
        assert (full / name).read_bytes() == (content.read_bytes() if isinstance(content, Path) else content)


def test_tree_listing_and_pagination(hub):
    hub.add_repo("org/tree", {f"f{i}.txt": b"x" * i for i in range(5)} | {"a/b/c.txt": b"c", "a/d.bin": b"\0d"})
    hub.tree_page_size = 2
    api = HfApi()
    files = api.list_repo_files("org/tree")
    assert sorted(files) == sorted([".gitattributes", "a/b/c.txt", "a/d.bin"] + [f"f{i}.txt" for i in range(5)])
    assert len([r for r in hub.requests if r.route == "tree"]) == 5  # 10 entries (files and folders), 2 per page

    top = {e.path: type(e).__name__ for e in api.list_repo_tree("org/tree", path_in_repo="a")}
    assert top == {"a/b": "RepoFolder", "a/d.bin": "RepoFile"}
    lfs_file = next(e for e in api.list_repo_tree("org/tree", path_in_repo="a") if e.path == "a/d.bin")
    assert lfs_file.lfs.sha256 == hashlib.sha256(b"\0d").hexdigest() and lfs_file.size == 2
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/tree", path_in_repo="nope"))


def test_safetensors_metadata_reads_only_header_ranges(hub, tmp_path):
    single = weights(tmp_path / "single.safetensors")
    hub.add_repo("org/single", {"config.json": CONFIG, "model.safetensors": single})
    hub.add_repo("org/sharded", sharded_files(tmp_path))
    api = HfApi()

    meta = api.get_safetensors_metadata("org/single")
    assert not meta.sharded and set(meta.weight_map) == {"layer0.weight", "layer0.bias"}
    assert meta.files_metadata["model.safetensors"].tensors["layer0.weight"].shape == [64, 512]

    meta = api.get_safetensors_metadata("org/sharded")
    assert meta.sharded and meta.metadata == {"total_size": 2 * (64 * 512 + 512) * 4}
    assert meta.weight_map["layer2.weight"] == "model-00002-of-00002.safetensors"
    assert meta.files_metadata["model-00001-of-00002.safetensors"].tensors["layer1.bias"].shape == [512]

    reads = weight_reads(hub)
    assert len(reads) == 3 and all(r.range == "bytes=0-100000" and r.status == 206 for r in reads)
    assert all(r.body_bytes == 100001 < single.stat().st_size for r in reads)  # never the whole file


def test_offline_mode_in_process_with_warm_cache(hub, tmp_path, monkeypatch):
    hub.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": weights(tmp_path / "w.safetensors")})
    online = snapshot_download("org/tiny")
    hub.clear_requests()

    # HF_HUB_OFFLINE is read at import time: in-process, patch the constant (is_offline_mode() reads it per call).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot_download("org/tiny") == online
    assert Path(hf_hub_download("org/tiny", "config.json")).read_bytes() == CONFIG
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("org/other", "config.json")
    assert hub.requests == []


def test_subprocess_online_then_offline(hub, tmp_path):
    sha = hub.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": weights(tmp_path / "w.safetensors")},
                       private=True)
    script = textwrap.dedent("""
        import sys
        from huggingface_hub import constants, snapshot_download
        assert constants.ENDPOINT == sys.argv[1], constants.ENDPOINT
        print(snapshot_download("org/tiny"))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hub.client_env(), HF_HOME=str(tmp_path / "sub-hf"), HF_TOKEN=TOKEN)

    def run(**extra):
        done = subprocess.run([sys.executable, "-c", script, hub.url], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip().splitlines()[-1])

    folder = run()
    assert folder.name == sha and (folder / "config.json").read_bytes() == CONFIG
    assert hub.tokens_seen == {TOKEN}
    hub.clear_requests()
    assert run(HF_HUB_OFFLINE="1") == folder
    assert hub.requests == []


def test_error_classes(hub):
    hub.add_repo("org/tiny", {"config.json": CONFIG})
    hub.add_repo("org/secret", {"config.json": CONFIG}, private=True)
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/tiny", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/tiny", "config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):  # a subclass of EntryNotFoundError in 2.4
        hf_hub_download("org/tiny", "missing.json")
    assert not api.file_exists("org/tiny", "missing.json") and api.file_exists("org/tiny", "config.json")

    with pytest.raises(RepositoryNotFoundError):  # private, no token
        api.model_info("org/secret")
    assert api.model_info("org/secret", token=TOKEN).private is True
    with pytest.raises(HfHubHTTPError) as err:  # an unknown token is refused everywhere, like on the Hub
        api.model_info("org/tiny", token="hf_wrong")
    assert err.value.response.status_code == 401

    assert api.whoami(token=TOKEN)["name"] == "tester"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_wrong")


def test_gated_repo_needs_a_token(hub, tmp_path, monkeypatch):
    hub.add_repo("org/gated", {"config.json": CONFIG, "model.safetensors": weights(tmp_path / "w.safetensors")},
                 gated=True)
    api = HfApi()
    assert api.model_info("org/gated").gated == "auto"  # metadata stays public
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json")
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated")
    with pytest.raises(GatedRepoError):
        api.get_safetensors_metadata("org/gated")
    assert hub.tokens_seen == set()

    assert Path(hf_hub_download("org/gated", "config.json", token=TOKEN)).read_bytes() == CONFIG
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the implicit token is read from the environment at each call
    assert api.get_safetensors_metadata("org/gated").files_metadata["model.safetensors"].tensors
    assert hub.tokens_seen == {TOKEN}
    assert all(r.headers.get("Authorization") in (None, "<redacted>") for r in hub.requests)


def test_create_repo_upload_folder_branch_and_tag(hub, tmp_path):
    api = HfApi(token=TOKEN)
    url = api.create_repo("org/new", private=True)
    assert url.repo_id == "org/new" and hub.repo("org/new").private
    api.create_repo("org/new", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/new")
    assert err.value.response.status_code == 409
    assert api.create_repo("mine").repo_id == "tester/mine"  # no namespace: the token's user

    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    weights(folder / "model.safetensors")
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# New\n")
    (folder / "sub" / "notes.txt").write_text("hello")
    info = api.upload_folder(repo_id="org/new", folder_path=folder, commit_message="Upload merged model")
    assert info.oid == hub.resolve("org/new") and info.repo_url.repo_id == "org/new"

    expected = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    got = hub.files("org/new")
    assert got.pop(".gitattributes") and got == expected
    assert [c.title for c in hub.commits("org/new")] == ["initial commit", "Upload merged model"]
    assert api.model_info("org/new").card_data.license == "mit"
    puts = [r for r in hub.requests if r.route == "lfs_upload"]
    assert len(puts) == 1 and puts[0].status == 200  # only the weights went through LFS

    # Re-uploading the same folder: the preupload oids tell the client nothing changed, so no commit is made.
    api.upload_folder(repo_id="org/new", folder_path=folder)
    assert len(hub.commits("org/new")) == 2

    api.create_branch("org/new", branch="dev")
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="org/new", revision="dev")
    api.create_tag("org/new", tag="v1", revision="dev")
    assert hub.files("org/new", "v1")["dev.txt"] == b"dev only" and "dev.txt" not in hub.files("org/new")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/new", revision="nope")
    api.delete_file("sub/notes.txt", repo_id="org/new")
    assert "sub/notes.txt" not in hub.files("org/new")


def test_interrupted_upload_resends_only_missing_objects(hub, tmp_path):
    api = HfApi(token=TOKEN)
    api.create_repo("org/big")
    folder = tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        weights(folder / f"model-{i}.safetensors", seed=i)
    (folder / "config.json").write_bytes(CONFIG)
    oids = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}
    victim = hashlib.sha256((folder / "model-2.safetensors").read_bytes()).hexdigest()

    hub.inject_failure("lfs_upload", match=victim)  # a 4xx: not retried by the client
    with pytest.raises(RuntimeError, match="model-2.safetensors") as err:
        api.upload_folder(repo_id="org/big", folder_path=folder)
    assert isinstance(err.value.__cause__, HfHubHTTPError)
    # The client raised once its other PUTs were over; let the server finish serving them (and record them) too,
    # so that what arrived is final and no request of this run shows up among those of the next one.
    hub.wait_idle()
    assert len(hub.commits("org/big")) == 1  # nothing was committed
    arrived = hub.lfs_objects("org/big")  # only objects received in full, with their sha256 and size
    assert victim not in arrived and arrived <= oids
    first = [r for r in hub.requests if r.route == "lfs_upload"]
    assert {r.path.rsplit("/", 1)[1] for r in first if r.status == 200} == arrived

    hub.clear_requests()
    api.upload_folder(repo_id="org/big", folder_path=folder)
    hub.wait_idle()
    resent = {r.path.rsplit("/", 1)[1] for r in hub.requests if r.route == "lfs_upload"}
    assert victim in resent and resent == oids - arrived
    got = hub.files("org/big")
    assert got.pop(".gitattributes") and got == {p.name: p.read_bytes() for p in folder.iterdir()}

    # A commit refused after all uploads: the next run commits without sending any object again.
    (folder / "config.json").write_bytes(b"{}")
    weights(folder / "model-9.safetensors", seed=9)
    hub.inject_failure("commit", status=409)
    with pytest.raises(HfHubHTTPError):
        api.upload_folder(repo_id="org/big", folder_path=folder)
    hub.wait_idle()
    hub.clear_requests()
    api.upload_folder(repo_id="org/big", folder_path=folder)
    hub.wait_idle()
    assert [r for r in hub.requests if r.route == "lfs_upload"] == []
    assert hub.files("org/big")["config.json"] == b"{}" and "model-9.safetensors" in hub.files("org/big")


def test_uploads_need_a_valid_token(hub, tmp_path):
    hub.add_repo("org/tiny", {"config.json": CONFIG})
    with pytest.raises(HfHubHTTPError):
        HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/tiny")
    assert len(hub.commits("org/tiny")) == 2


def test_resolve_ranges_and_headers(hub):
    data = bytes(range(256)) * 4
    sha = hub.add_repo("org/raw", {"blob.bin": data, "notes.txt": b"hello"})
    session = get_session()
    url = f"{hub.url}/org/raw/resolve/main/blob.bin"

    head = session.head(url)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == sha
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(data))
    regular = session.head(f"{hub.url}/org/raw/resolve/{sha}/notes.txt")
    assert "X-Linked-Etag" not in regular.headers and regular.headers["ETag"] == f'"{git_blob_sha1(b"hello")}"'

    for rng, start, end in (("bytes=10-19", 10, 19), ("bytes=1000-", 1000, 1023), ("bytes=-5", 1019, 1023),
                            ("bytes=1020-5000", 1020, 1023)):
        got = session.get(url, headers={"Range": rng})
        assert (got.status_code, got.content) == (206, data[start:end + 1])
        assert got.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
    refused = session.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert refused.status_code == 416 and refused.headers["Content-Range"] == f"bytes */{len(data)}"
    missing = session.head(f"{hub.url}/org/raw/resolve/main/nope.txt")
    assert missing.headers["X-Error-Code"] == "EntryNotFound" and missing.headers["X-Repo-Commit"] == sha
