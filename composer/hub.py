"""The Hub: resolve `org/name[@revision]` to an exact commit, fetch only what a plan needs, push an output folder."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from composer.dtypes import ITEMSIZE
from composer.errors import CorruptFileError, HubError, PushError
from composer.filecheck import stamps_of
from composer.sources import (
    INDEX_NAME, SINGLE_NAME, HubOrigin, SourceModel, TensorInfo, convert_pickle, parse_hub_id, read_config,
    read_weights,
)
from composer.tokenizer import TOKENIZER_FILES

# Small files a plan may read: the config, generation defaults, the card (for the license) and the tokenizer.
META_FILES = ("config.json", "generation_config.json", "README.md", *TOKENIZER_FILES)
PICKLE_INDEX, PICKLE_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


@dataclass(frozen=True)
class Snapshot:
    """One commit of a repo: its files (all of them online; those in the cache offline)."""

    repo_id: str
    revision: str | None
    commit: str
    files: frozenset[str]
    offline: bool


class HubClient:
    """The Hub as composer uses it. `api` is a huggingface_hub.HfApi (HF_ENDPOINT, HF_TOKEN, HF_HOME and
    HF_HUB_OFFLINE apply as huggingface_hub reads them); tests point one at a fake Hub."""

    def __init__(self, api: Any = None):
        self._api = api

    @property
    def api(self) -> Any:
        if self._api is None:  # made on first use, so that runs without Hub models never import huggingface_hub
            from huggingface_hub import HfApi

            self._api = HfApi()
        return self._api

    # -- reading -----------------------------------------------------------------------------------------------------
    def open(self, name: str, *, headers_only: bool = False) -> SourceModel:
        """The model `name` (`org/name[@revision]`) at one exact commit. Downloads config, generation config, card and
        tokenizer files, then the weights; with `headers_only`, reads the safetensors headers by range requests
        instead (pickle weights have no header, so they are downloaded either way)."""
        repo_id, revision = parse_hub_id(name) or (name, None)
        snap = self._snapshot(name, repo_id, revision)
        if "config.json" not in snap.files:
            raise HubError(f"model '{name}': {repo_id} has no config.json at commit {snap.commit}: "
                           "composer needs a transformers model repo")
        # config.json by the revision asked for, so that the cache records where it points (offline runs read that)
        folder = self._download(name, snap, "config.json", revision or "main").parent
        if folder.name != snap.commit:
            raise HubError(f"model '{name}': {repo_id}@{revision or 'main'} moved to a new commit while composer read "
                           "it: run again, or pin a commit sha")
        for file in META_FILES[1:]:
            if file in snap.files:
                self._download(name, snap, file, snap.commit)
        config = read_config(name, folder)
        if config.get("auto_map"):  # custom modelling code, copied to the output (composer.remote_code)
            for file in sorted(f for f in snap.files if "/" not in f and f.endswith(".py")):
                self._download(name, snap, file, snap.commit)
        kind, weights = _choose_weights(name, snap)
        origin = HubOrigin(repo_id, revision, snap.commit, _card_license(folder / "README.md"), kind == "pickle")
        weight_map = self._index(name, snap, weights)
        shards = list(dict.fromkeys(weight_map.values())) if weight_map is not None else [weights]
        if kind == "pickle":
            tensors, files = self._converted(name, snap, shards, weight_map)
        elif headers_only and not all(self._cached(snap, f) for f in shards):
            tensors, files = self._remote_headers(name, snap, shards, weight_map), ()
        else:
            for file in shards:
                self._download(name, snap, file, snap.commit)
            tensors, files = read_weights(folder, name)
        return SourceModel(name=name, path=folder, config=config, tensors=tensors, files=files, hub=origin,
                           stamps=stamps_of(files))

    def open_adapter(self, name: str) -> tuple[Path, HubOrigin]:
        """A PEFT adapter repo `org/name[@revision]` at one exact commit: its config and weights, downloaded."""
        repo_id, revision = parse_hub_id(name) or (name, None)
        snap = self._snapshot(name, repo_id, revision, probe="adapter_config.json")
        if "adapter_config.json" not in snap.files:
            raise HubError(f"adapter '{name}': {repo_id} has no adapter_config.json at commit {snap.commit}: it is "
                           "not a PEFT adapter repo")
        folder = self._download(name, snap, "adapter_config.json", snap.commit).parent
        weights = next((f for f in ("adapter_model.safetensors", "adapter_model.bin") if f in snap.files), None)
        if weights is None:
            raise HubError(f"adapter '{name}': {repo_id} has no adapter_model.safetensors at commit {snap.commit}")
        self._download(name, snap, weights, snap.commit)
        return folder, HubOrigin(repo_id, revision, snap.commit, _card_license(folder / "README.md"),
                                 weights.endswith(".bin"))

    def _snapshot(self, name: str, repo_id: str, revision: str | None, probe: str = "config.json") -> Snapshot:
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.is_offline_mode():
            hit = try_to_load_from_cache(repo_id, probe, revision=revision or "main")
            if not isinstance(hit, str):
                raise HubError(f"model '{name}' not found: no local folder {name}, and HF_HUB_OFFLINE is set and "
                               f"{repo_id}@{revision or 'main'} is not in the Hub cache ({constants.HF_HUB_CACHE}): "
                               "check the path, run once online, or unset HF_HUB_OFFLINE")
            folder = Path(hit).parent
            files = frozenset(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            return Snapshot(repo_id, revision, folder.name, files, True)
        try:
            info = self.api.model_info(repo_id, revision=revision)
        except Exception as exc:
            raise _resolution_error(exc, name, repo_id, revision) from None
        return Snapshot(repo_id, revision, info.sha, frozenset(s.rfilename for s in info.siblings or ()), False)

    def _download(self, name: str, snap: Snapshot, file: str, revision: str) -> Path:
        try:
            return Path(self.api.hf_hub_download(snap.repo_id, file, revision=revision))
        except Exception as exc:
            raise _resolution_error(exc, name, snap.repo_id, snap.revision, file) from None

    def _cached(self, snap: Snapshot, file: str) -> bool:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(snap.repo_id, file, revision=snap.commit), str)

    def _index(self, name: str, snap: Snapshot, weights: str) -> dict[str, str] | None:
        """The weight map of a sharded checkpoint (its index is downloaded), or None for a single file."""
        if not weights.endswith(".index.json"):
            return None
        index = self._download(name, snap, weights, snap.commit)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
                return weight_map
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            pass
        raise CorruptFileError(f"model '{name}': {weights} at commit {snap.commit} has no valid weight_map")

    def _remote_headers(self, name: str, snap: Snapshot, shards: list[str],
                        weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        """The tensor table from the safetensors headers alone: one range request per file (two for a header over
        100 kB); nothing else of a weight file is read."""
        tensors: dict[str, TensorInfo] = {}
        for file in shards:
            try:
                meta = self.api.parse_safetensors_file_metadata(snap.repo_id, file, revision=snap.commit)
            except Exception as exc:
                raise _resolution_error(exc, name, snap.repo_id, snap.revision, file) from None
            for tensor, t in meta.tensors.items():
                if t.dtype not in ITEMSIZE:
                    raise CorruptFileError(f"model '{name}': tensor '{tensor}' in {file} has unknown dtype {t.dtype}")
                tensors[tensor] = TensorInfo(tensor, t.dtype, tuple(t.shape), None, 0)
        if weight_map is None:
            return tensors
        missing = [t for t in weight_map if t not in tensors]
        if missing:
            raise CorruptFileError(f"model '{name}': {INDEX_NAME} names tensor '{missing[0]}', which no shard has")
        return {t: tensors[t] for t in weight_map}

    def _converted(self, name: str, snap: Snapshot, shards: list[str],
                   weight_map: dict[str, str] | None) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
        """Pickle weights, converted once per commit to safetensors under HF_HOME/composer/converted/ (beside the
        Hub cache, keyed by the commit, so later runs and offline runs reuse them)."""
        from huggingface_hub import constants

        dest = Path(constants.HF_HOME) / "composer" / "converted" / snap.repo_id.replace("/", "--") / snap.commit
        dest.mkdir(parents=True, exist_ok=True)
        names = {b: SINGLE_NAME if weight_map is None else b.removesuffix(".bin") + ".safetensors" for b in shards}
        for b in shards:
            if not (dest / names[b]).is_file():
                convert_pickle(self._download(name, snap, b, snap.commit), dest / names[b], name)
        if weight_map is not None and not (dest / INDEX_NAME).is_file():
            index = {"metadata": {"converted_from": PICKLE_INDEX},
                     "weight_map": {t: names[f] for t, f in weight_map.items()}}
            tmp = dest / f".{INDEX_NAME}.tmp"
            tmp.write_text(json.dumps(index, indent=2))
            tmp.replace(dest / INDEX_NAME)
        return read_weights(dest, name)

    # -- writing -----------------------------------------------------------------------------------------------------
    def check_push(self, repo_id: str) -> None:
        """Refuse early (before a long compose) what would make the push fail: offline, no token, a rejected one."""
        from huggingface_hub import constants, get_token

        if parse_hub_id(repo_id) is None or "@" in repo_id:
            raise PushError(f"'{repo_id}' is not a Hub repo id: write it as ORG/NAME (the branch goes in --revision)")
        if constants.is_offline_mode():
            raise PushError("cannot push while HF_HUB_OFFLINE is set: unset it")
        if not get_token():
            raise PushError("pushing needs a Hub token with write access: set HF_TOKEN or run `hf auth login`")
        try:
            self.api.whoami()
        except Exception as exc:
            raise _push_error(exc, repo_id, None) from None

    def push(self, folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
             commit_message: str | None = None) -> dict[str, Any]:
        """Upload an output folder to `repo_id` (created if missing, on branch `revision`). Re-running after an
        interruption sends only what the Hub lacks. Returns {"repo_url", "commit", "revision"}."""
        self.check_push(repo_id)
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise PushError(f"{folder} is not a composed model folder (no config.json or no .safetensors): "
                            "give the folder that `compose -o` wrote")
        try:
            url = self.api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                self.api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = self.api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision,
                commit_message=commit_message or f"Upload {folder.name}, composed with composer",
            )
        except Exception as exc:
            raise _push_error(exc, repo_id, folder) from None
        return {"repo_url": str(url), "commit": info.oid, "revision": revision or "main"}


def _choose_weights(name: str, snap: Snapshot) -> tuple[str, str]:
    """("safetensors" | "pickle", the index or single file), preferring safetensors, as transformers does."""
    top = sorted(f for f in snap.files if "/" not in f)
    single = [f for f in top if f.endswith(".safetensors")]
    for kind, file in (("safetensors", INDEX_NAME), ("safetensors", SINGLE_NAME),
                       ("safetensors", single[0] if len(single) == 1 else None),
                       ("pickle", PICKLE_INDEX), ("pickle", PICKLE_SINGLE)):
        if file in snap.files:
            return kind, file
    where = f"{snap.repo_id} at commit {snap.commit}"
    if snap.offline:
        raise HubError(f"model '{name}': HF_HUB_OFFLINE is set and the weights of {where} are not in the cache: "
                       "run once online, or unset HF_HUB_OFFLINE")
    if len(single) > 1:
        raise HubError(f"model '{name}': {where} has {len(single)} .safetensors files and no {INDEX_NAME}")
    raise HubError(f"model '{name}': {where} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}) and no "
                   f"{PICKLE_SINGLE}: composer reads only those")


def _card_license(readme: Path) -> dict[str, str]:
    """license (and license_name, license_link for `other`) from a model card's front matter."""
    try:
        m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", readme.read_text(errors="replace"), re.S)
        front = yaml.safe_load(m.group(1)) if m else None
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(front, dict):
        return {}
    return {k: str(front[k]) for k in ("license", "license_name", "license_link") if front.get(k)}


def _first_line(exc: BaseException) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return _redact(text)


def _redact(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def _transport_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore") or isinstance(exc, ConnectionError)


def _resolution_error(exc: Exception, name: str, repo_id: str, revision: str | None,
                      file: str | None = None) -> Exception:
    """Each huggingface_hub failure as one line that names the model and the fix; other errors pass unchanged."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    token = get_token() is not None
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError, its base class
        who = "the token in use has no access" if token else "no token is set"
        return HubError(f"model '{name}': {repo_id} is gated and {who}: accept its conditions at "
                        f"{constants.ENDPOINT}/{repo_id}, then set HF_TOKEN to a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        fix = "check the name, or use a token that can see the repo" if token else "check the name, or set HF_TOKEN"
        return HubError(f"model '{name}' is neither a local folder nor a Hub repo this client can see (no repo "
                        f"{repo_id} at {constants.ENDPOINT}, or a private one): {fix}")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"model '{name}': {repo_id} has no revision '{revision}': use a branch, a tag or a commit sha")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubError(f"model '{name}': HF_HUB_OFFLINE is set and {file or 'a file'} of {repo_id} is not in the "
                        "cache: run once online, or unset HF_HUB_OFFLINE")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"model '{name}': {repo_id} has no file {file} at revision {revision or 'main'}")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        return HubError("the Hub rejected the token (401, invalid credentials): set HF_TOKEN to a valid token, "
                        "or unset it for public models")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"model '{name}': the Hub failed on {repo_id}: {_first_line(exc)}")
    if _transport_error(exc):
        return HubError(f"model '{name}' not found: no local folder {name}, and the Hub at {constants.ENDPOINT} "
                        f"cannot be reached ({_first_line(exc)}): check the path or the network, pass --model "
                        f"{name}=/path/to/local/copy, or set HF_HUB_OFFLINE=1 to use the Hub cache")
    return exc


def _push_error(exc: Exception, repo_id: str, folder: Path | None) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    again = (f"; the model is complete in {folder}: run `compose-push {folder} {repo_id}` to send what is missing"
             if folder is not None else "")
    if isinstance(exc, OfflineModeIsEnabled):
        return PushError("cannot push while HF_HUB_OFFLINE is set: unset it")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return PushError("the Hub rejected the token (401, invalid credentials): set HF_TOKEN to a valid token "
                         f"with write access{again}")
    if status == 403:
        return PushError(f"the token in use cannot write to {repo_id} (403): use a token with write access to it"
                         f"{again}")
    if isinstance(exc, HfHubHTTPError):
        return PushError(f"push to {repo_id} failed ({_first_line(exc)}){again}")
    cause = exc.__cause__
    if isinstance(exc, RuntimeError) and isinstance(cause, (HfHubHTTPError, ConnectionError)):  # an upload failed
        return PushError(f"upload to {repo_id} was interrupted ({_first_line(exc)} {_first_line(cause)}){again}")
    if _transport_error(exc):
        return PushError(f"cannot reach the Hub to push to {repo_id} ({_first_line(exc)}){again}")
    return exc
