"""A fake Hugging Face Hub HTTP server for tests (standard library only).

It speaks enough of the Hub's HTTP API for the real ``huggingface_hub`` client (2.4) to inspect, download and upload
model repos on 127.0.0.1: repo info, tree listing (paginated), refs, commits, ``resolve`` (HEAD/GET with ranges),
whoami, repo/branch/tag creation, preupload, the git-LFS batch API, LFS object PUTs and the NDJSON commit endpoint.
Only model repos with ``namespace/name`` ids are served; pull requests and Xet storage are not.

    with FakeHub(tmp_path / "hub") as hub:        # a ThreadingHTTPServer on 127.0.0.1, random port
        sha = hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": weights_path}, gated=True)
        hub.add_tag("org/tiny", "v1", sha)          # revisions: branch, tag, full or short sha
        use_fake_hub(monkeypatch, hub, tmp_path / "hf")  # or hub.client_env() for a subprocess, see below
        ...
        assert hub.files("org/tiny") == {...}       # includes the .gitattributes of the "initial commit"
        assert all(r.range for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors"))

Public API: ``FakeHub(root_dir=None, tokens={"hf_fake_token": "tester"})``; ``start()/stop()`` or ``with``; ``url``;
``client_env()``; ``add_repo``, ``add_branch``, ``add_tag``; ``inject_failure(route, times, status, match)``;
``files``, ``commits``, ``resolve``, ``lfs_objects``, ``repo``; ``requests`` (RequestRecord list), ``tokens_seen``,
``clear_requests()``, ``wait_idle()``; ``allowed_tokens`` (token -> user) and ``tree_page_size`` may be changed at any time.

Pointing the client at the server
---------------------------------
``huggingface_hub`` reads its environment once, at import time, into ``huggingface_hub.constants`` (ENDPOINT,
HUGGINGFACE_CO_URL_TEMPLATE, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, HF_HUB_DISABLE_TELEMETRY, HF_HOME and every cache and
token path derived from it). The module-level ``huggingface_hub.hf_api.api`` (behind ``huggingface_hub.model_info``,
``create_repo``, ...) also froze ``constants.ENDPOINT`` when it was built. HF_TOKEN is read at each call. Hence:

* Subprocess (e.g. the CLI): put the variables in its environment before it starts::

      env = {**os.environ, **hub.client_env(), "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_fake_token"}
      subprocess.run([sys.executable, "-m", "composer", ...], env=env)

  ``client_env()`` sets HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET=1, HF_HUB_DISABLE_TELEMETRY=1 and quiets progress
  bars and update checks; add HF_HUB_OFFLINE=1 for an offline run. Drop any inherited HF_TOKEN if auth must be absent.

* In-process: setting ``os.environ`` is too late, use ``use_fake_hub(monkeypatch, hub, home)``, which patches those
  constants and ``hf_api.api.endpoint``, moves HF_HOME (cache, token file) to ``home``, unsets HF_TOKEN and also sets
  the environment variables for subprocesses. Passing ``endpoint=hub.url`` to ``HfApi``, ``hf_hub_download`` and
  ``snapshot_download`` works for downloads too, but uploads still need Xet disabled and caches still need moving.
  Offline mode in-process: ``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)``.

Client behaviours worth knowing (huggingface_hub 2.4)
-----------------------------------------------------
* With ``hf_xet`` installed and HF_HUB_DISABLE_XET unset, uploads go through Xet (``upload_folder`` even switches to a
  multi-commit "pipelined" upload) and fail at once here with ``ConnectionError`` (hf_xet gets a 404 from
  ``/api/models/{repo}/xet-write-token/{rev}``). With Xet disabled, the legacy path is used: preupload (whose "oid"
  lets the client skip unchanged files) -> LFS batch -> PUT of each object the batch lists -> one NDJSON commit.
  Downloads never use Xet here, as no ``X-Xet-Hash`` header is sent.
* Status 408/429/500/502/503/504 and connection errors are retried with backoff (1+2+4+8+8 s) by preupload, the LFS
  batch, LFS PUTs, tree pagination and the HEAD of hf_hub_download when nothing is cached, so inject 4xx failures: they
  are raised at once. A failing LFS PUT surfaces as ``RuntimeError("Error while uploading '<path>' to the Hub.")``
  (cause: ``HfHubHTTPError``); the other PUTs still run and the commit is never sent. The next LFS batch call reports
  the objects that arrived as present, so a re-run only PUTs the rest. The commit POST itself is not retried.
  An object counts as present (``lfs_objects``, batch answers, commits) only once its whole body arrived with the
  sha256 and the size announced to the batch call. A request is in ``requests`` before its response goes out, so
  whatever the client has seen is recorded; ``wait_idle()`` also waits out requests still being served (a client
  may give up on a call while its other threads' requests run on): call it before snapshotting the server's state.
* Error classes: X-Error-Code RepoNotFound/GatedRepo/RevisionNotFound/EntryNotFound give RepositoryNotFoundError,
  GatedRepoError (a subclass of RepositoryNotFoundError!), RevisionNotFoundError and RemoteEntryNotFoundError (an
  HfHubHTTPError and an EntryNotFoundError, as is LocalEntryNotFoundError, raised offline on a cache miss).
* A bearer token that is not in ``hub.allowed_tokens`` gets 401 "Invalid credentials in Authorization header" on
  every endpoint, like the real Hub; without a token, private repos are RepoNotFound and gated files are GatedRepo
  (their metadata and file list stay public). Writes need a valid token.
* ``model_info`` siblings carry sizes and LFS sha256 only with ``files_metadata=True``, as on the Hub.
* Without HF_HUB_DISABLE_TELEMETRY, the first request of a process fetches ``{ENDPOINT}/api/agent-harnesses`` to build
  its user agent (served here); against the real ENDPOINT this is a failed DNS lookup, harmless.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib
import itertools
import json
import math
import re
import socket
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

# Files stored with git-LFS (as by the Hub's default .gitattributes), as well as anything binary or over 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz",
                ".pkl", ".model", ".zip", ".tar", ".gz", ".parquet", ".arrow")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
# Route names, for inject_failure() and RequestRecord.route.
ROUTES = ("whoami", "agent_harnesses", "validate_yaml", "create_repo", "model_info", "tree", "refs", "commits",
          "preupload", "commit", "branch", "tag", "resolve", "lfs_batch", "lfs_upload")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Entry:
    """A file of a commit. Contents live in the object store under their sha256 (``oid``)."""
    oid: str
    size: int
    lfs: bool
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files: the Hub's "blobId"/"oid"


@dataclass
class Commit:
    sha: str
    title: str
    message: str
    parent: str | None
    files: dict[str, Entry]
    author: str
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool | str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # LFS oids uploaded to (or committed in) this repo
    created_at: str = field(default_factory=_now)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # URL-decoded, without the query string
    query: str
    headers: dict[str, str]  # the Authorization value is redacted
    range: str | None
    status: int
    body_bytes: int  # response body bytes sent
    route: str


class HubError(Exception):
    """An HTTP error answered by the server; ``code`` goes to X-Error-Code, which the client maps to its errors."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.body = status, code, message, headers or {}, body


@dataclass
class _Failure:
    route: str
    times: int
    status: int
    match: str | None


class FakeHub:
    """The fake Hub: repo store plus HTTP server. Use as a context manager, or call start() and stop()."""

    def __init__(self, root_dir: str | Path | None = None, *, tokens: dict[str, str] | None = None):
        self.root = Path(root_dir) if root_dir is not None else Path(tempfile.mkdtemp(prefix="fakehub-"))
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.allowed_tokens: dict[str, str] = dict(tokens or {"hf_fake_token": "tester"})  # token -> user name
        self.tree_page_size = 1000  # entries per page of /tree, as on the Hub
        self.tokens_seen: set[str] = set()
        self._repos: dict[str, Repo] = {}
        self._requests: list[RequestRecord] = []
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._active = 0  # requests being served: read, handled or answered, and not yet recorded
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        self._server = _Server(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakehub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Close the kept-alive connections too: their handler threads would otherwise keep serving this hub to the
        # client's connection pool, even if a later FakeHub got the same port.
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client_env(self) -> dict[str, str]:
        """Environment variables pointing a huggingface_hub process at this server (HF_HOME is up to the caller)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}

    # -- populating -------------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes | str | Path] | None = None, *, revision: str = "main",
                 gated: bool | str | None = None, private: bool | None = None, card: dict | str | None = None,
                 message: str = "Upload files", author: str = "tester") -> str:
        """Commit ``files`` (path in repo -> bytes, str text or Path of a local file) on branch ``revision``; return
        the new commit's sha. Earlier commits stay reachable by their sha.

        Creates the repo (with the Hub's "initial commit" of .gitattributes) and the branch (from main) if needed.
        ``card`` writes README.md: a dict becomes its YAML front matter (as JSON, which YAML reads), a str the whole
        file. ``gated``/``private`` change the repo's settings when not None.
        """
        contents = dict(files or {})
        if card is not None:
            contents["README.md"] = card if isinstance(card, str) else f"---\n{json.dumps(card)}\n---\n# {repo_id}\n"
        with self._lock:
            repo = self._repos.get(repo_id) or self._create_repo(repo_id, private=False, gated=False)
            if private is not None:
                repo.private = private
            if gated is not None:
                repo.gated = "auto" if gated is True else gated
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            tree = dict(repo.commits[repo.branches[revision]].files)
            for path, value in contents.items():
                data = value.read_bytes() if isinstance(value, Path) else value.encode() if isinstance(value, str) \
                    else value
                tree[path] = self._entry(data, is_lfs(path, len(data), data[:512]))
                if tree[path].lfs:
                    repo.lfs_objects.add(tree[path].oid)
            return self._new_commit(repo, revision, tree, message, "", author)

    def add_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        with self._lock:
            repo = self._get_repo(repo_id)
            repo.branches[branch] = sha = self._rev(repo, revision).sha
            return sha

    def add_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self._lock:
            repo = self._get_repo(repo_id)
            repo.tags[tag] = sha = self._rev(repo, revision).sha
            return sha

    def inject_failure(self, route: str, *, times: int = 1, status: int = 403, match: str | None = None) -> None:
        """Answer the next ``times`` requests of ``route`` (see ROUTES) whose decoded path contains ``match`` with
        ``status``. Use a 4xx: the client retries 5xx for ~23 s. E.g. ``inject_failure("lfs_upload", match=oid)``."""
        assert route in ROUTES, route
        with self._lock:
            self._failures.append(_Failure(route, times, status, match))

    # -- inspecting -------------------------------------------------------------------------------------------------
    def resolve(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            return self._rev(self._get_repo(repo_id), revision).sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of every file at ``revision`` (including the .gitattributes of the initial commit)."""
        with self._lock:
            entries = dict(self._rev(self._get_repo(repo_id), revision).files)
        return {path: self._read(e) for path, e in sorted(entries.items())}

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits reachable from ``revision``, oldest first (the first is the "initial commit")."""
        with self._lock:
            repo = self._get_repo(repo_id)
            chain, commit = [], self._rev(repo, revision)
            while commit is not None:
                chain.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return chain[::-1]

    def lfs_objects(self, repo_id: str) -> set[str]:
        with self._lock:
            return set(self._get_repo(repo_id).lfs_objects)

    def repo(self, repo_id: str) -> Repo:
        return self._get_repo(repo_id)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is being served (each request read so far is handled, answered and recorded).

        A request still in the client's socket buffer, not yet read by the server, is not waited for: call this once
        the client has returned (or raised), whose requests were all answered or abandoned by then."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, timeout):
                raise TimeoutError(f"FakeHub: {self._active} request(s) still in progress after {timeout} s")

    def clear_requests(self) -> None:
        """Forget the requests and tokens seen so far."""
        with self._lock:
            self._requests.clear()
            self.tokens_seen.clear()

    # -- internals (callers hold self._lock where state is mutated) -------------------------------------------------
    def _store(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        path = self.root / "objects" / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return oid

    def _read(self, entry: Entry, start: int = 0, length: int | None = None) -> bytes:
        with open(self.root / "objects" / entry.oid, "rb") as f:
            f.seek(start)
            return f.read(entry.size - start if length is None else length)

    def _entry(self, data: bytes, lfs: bool) -> Entry:
        oid = self._store(data)
        return Entry(oid, len(data), lfs, git_blob_sha1(lfs_pointer(oid, len(data)) if lfs else data))

    def _lfs_entry(self, oid: str) -> Entry:
        size = (self.root / "objects" / oid).stat().st_size
        return Entry(oid, size, True, git_blob_sha1(lfs_pointer(oid, size)))

    def _create_repo(self, repo_id: str, *, private: bool, gated: bool | str) -> Repo:
        repo = self._repos[repo_id] = Repo(repo_id, private, gated)
        sha = self._new_commit(repo, None, {".gitattributes": self._entry(GITATTRIBUTES, False)}, "initial commit",
                               "", "system")
        repo.branches["main"] = sha
        return repo

    def _new_commit(self, repo: Repo, branch: str | None, files: dict[str, Entry], title: str, message: str,
                    author: str) -> str:
        parent = repo.branches.get(branch) if branch else None
        seed = json.dumps([repo.repo_id, parent, title, sorted((p, e.oid) for p, e in files.items()),
                           next(self._counter)])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, title, message, parent, files, author)
        if branch:
            repo.branches[branch] = sha
        return sha

    def _get_repo(self, repo_id: str) -> Repo:
        if repo_id not in self._repos:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return self._repos[repo_id]

    def _rev(self, repo: Repo, rev: str) -> Commit:
        sha = repo.branches.get(rev) or repo.tags.get(rev)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [s for s in repo.commits if s.startswith(rev)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo.commits[sha]

    def _json_file(self, commit: Commit, path: str) -> dict | None:
        try:
            return json.loads(self._read(commit.files[path]))
        except (KeyError, ValueError):
            return None

    def _model_info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        siblings = []
        for path, e in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:  # sizes and blob ids only with ?blobs=true (files_metadata=True), as on the Hub
                sibling.update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    sibling["lfs"] = {"sha256": e.oid, "size": e.size, "pointerSize": len(lfs_pointer(e.oid, e.size))}
            siblings.append(sibling)
        card = _front_matter(self._read(commit.files["README.md"])) if "README.md" in commit.files else None
        info = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
                "tags": list((card or {}).get("tags") or []), "siblings": siblings, "spaces": []}
        for key in ("library_name", "pipeline_tag"):
            if card and card.get(key):
                info[key] = card[key]
        if card is not None:
            info["cardData"] = card
        config = self._json_file(commit, "config.json")
        if isinstance(config, dict):
            info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        params: dict[str, int] = {}
        for path, e in commit.files.items():  # parameter counts from the safetensors headers, as the Hub shows
            if path.endswith(".safetensors") and e.size >= 8:
                try:
                    header = json.loads(self._read(e, 8, int.from_bytes(self._read(e, 0, 8), "little")))
                    for name, t in header.items():
                        if name != "__metadata__":
                            params[t["dtype"]] = params.get(t["dtype"], 0) + math.prod(t["shape"])
                except (ValueError, KeyError, TypeError):
                    pass
        if params:
            info["safetensors"] = {"parameters": params, "total": sum(params.values())}
        return info

    def _tree(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        under = {p[len(prefix):]: e for p, e in commit.files.items() if p.startswith(prefix)}
        if path and not under:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on this revision")
        dirs, files = set(), {}
        for rel, e in under.items():
            parts = rel.split("/")
            if recursive or len(parts) == 1:
                files[rel] = e
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) if recursive else min(len(parts), 2)))
        entries = []
        for d in sorted(dirs):
            oids = "".join(e.git_oid for p, e in sorted(under.items()) if p.startswith(d + "/"))
            entries.append({"type": "directory", "oid": hashlib.sha1(oids.encode()).hexdigest(), "size": 0,
                            "path": prefix + d})
        for rel, e in sorted(files.items()):
            item = {"type": "file", "oid": e.git_oid, "size": e.size, "path": prefix + rel}
            if e.lfs:
                item["lfs"] = {"oid": e.oid, "size": e.size, "pointerSize": len(lfs_pointer(e.oid, e.size))}
            entries.append(item)
        return entries

    def _check_failure(self, route: str, path: str) -> None:
        with self._lock:
            for f in self._failures:
                if f.route == route and f.times > 0 and (f.match is None or f.match in path):
                    f.times -= 1
                    raise HubError(f.status, None, f"FakeHub: injected failure of {route}")


def _front_matter(readme: bytes) -> dict | None:
    """The YAML front matter of a model card: JSON is parsed here, real YAML with PyYAML when installed."""
    m = re.match(r"---\r?\n(.*?)\r?\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.S)
    if not m:
        return None
    try:
        data = json.loads(m.group(1))
    except ValueError:
        try:
            import yaml  # a dependency of huggingface_hub, not of this module
            data = yaml.safe_load(m.group(1))
        except Exception:
            return None
    return data if isinstance(data, dict) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # the client's pooled keep-alive connections must not block stop()
    request_queue_size = 128  # snapshot_download opens 8 connections at once: a backlog of 5 would drop SYNs


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections: every response sets Content-Length
    disable_nagle_algorithm = True  # headers and body are two writes: without this, ~40 ms of delayed ACK each
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        hub, split = self.hub, urlsplit(self.path)
        self._status, self._sent, self._route, self._recorded = 0, 0, "unknown", False
        with hub._lock:
            hub._active += 1
        self._query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        auth = self.headers.get("Authorization", "")
        self._token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        try:
            self._body = self._read_body()
            if self._token:
                with hub._lock:
                    hub.tokens_seen.add(self._token)
            # Split the raw path before decoding: an encoded revision such as refs%2Fpr%2F1 stays one segment.
            route, handler, args = self._match([unquote(s) for s in split.path.split("/")[1:]])
            self._route = route
            hub._check_failure(route, unquote(split.path))
            if route not in ("lfs_upload", "agent_harnesses"):  # the PUT target stands for a pre-signed URL
                self._user()
            handler(*args)
        except HubError as e:
            body, message = {"error": e.message, **e.body}, e.message.encode("ascii", "replace").decode()
            headers = {"X-Error-Message": message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._send_error(e.status, body, headers)
        except Exception as e:  # a bug here: answer 400, since the client would retry a 500 for ~23 s
            traceback.print_exc()
            self._send_error(400, {"error": f"FakeHub internal error: {e!r}"})
        finally:
            with hub._lock:
                self._record(self._status, self._sent)  # if no answer was sent
                hub._active -= 1
                hub._idle.notify_all()

    def _record(self, status: int, body_bytes: int) -> None:
        """Append this request to ``hub.requests``, once."""
        if self._recorded:
            return
        split = urlsplit(self.path)
        headers = {k: "<redacted>" if k.lower() == "authorization" else v for k, v in self.headers.items()}
        record = RequestRecord(self.command, unquote(split.path), split.query, headers, self.headers.get("Range"),
                               status, body_bytes, self._route)
        with self.hub._lock:
            self.hub._requests.append(record)
        self._recorded = True

    def _send_error(self, status: int, body: dict, headers: dict | None = None) -> None:
        try:
            self._send(status, body, headers)
        except OSError:  # the client went away (e.g. mid-body): nobody to answer
            self.close_connection = True

    def _read_body(self) -> bytes:
        """The whole request body; a body cut short (the client went away) is an error, never a shorter body."""
        def read(n: int) -> bytes:
            data = self.rfile.read(n)
            if len(data) != n:
                self.close_connection = True
                raise HubError(400, None, f"Incomplete request body: {len(data)} of {n} bytes")
            return data

        def readline() -> bytes:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                self.close_connection = True
                raise HubError(400, None, "Incomplete chunked request body")
            return line

        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(read(size))
                readline()
            while readline() not in (b"\r\n", b"\n"):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return read(length) if length else b""

    def _match(self, s: list[str]):
        method = "GET" if self.command == "HEAD" else self.command
        if method == "GET" and s == ["api", "whoami-v2"]:
            return "whoami", self._whoami, ()
        if method == "GET" and s == ["api", "agent-harnesses"]:
            return "agent_harnesses", self._send, (200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and s == ["api", "validate-yaml"]:
            return "validate_yaml", self._send, (200, {"errors": [], "warnings": []})
        if method == "POST" and s == ["api", "repos", "create"]:
            return "create_repo", self._create_repo, ()
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            routes = {("GET", ""): "model_info", ("GET", "revision"): "model_info", ("GET", "tree"): "tree",
                      ("GET", "refs"): "refs", ("GET", "commits"): "commits", ("POST", "preupload"): "preupload",
                      ("POST", "commit"): "commit", ("POST", "branch"): "branch", ("POST", "tag"): "tag"}
            if name := routes.get((method, rest[0] if rest else "")):
                return name, getattr(self, f"_{name}"), (repo_id, rest[1:])
        if method == "GET" and len(s) >= 5 and s[2] == "resolve":
            return "resolve", self._resolve, (f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if method == "POST" and len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            return "lfs_batch", self._lfs_batch, (f"{s[0]}/{s[1][:-4]}",)
        if method == "PUT" and len(s) == 4 and s[0] == "lfs-upload":
            return "lfs_upload", self._lfs_upload, (f"{s[1]}/{s[2]}", s[3])
        raise HubError(404, None, f"FakeHub: no route for {self.command} {self.path}")

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
              length: int | None = None) -> None:
        headers = dict(headers or {})
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        self._status, self._sent = status, 0 if self.command == "HEAD" else len(body)
        # Recorded before anything goes out: once the client has seen an answer, hub.requests holds its request.
        self._record(self._status, self._sent)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _user(self) -> str | None:
        if self._token is None:
            return None
        if self._token not in self.hub.allowed_tokens:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return self.hub.allowed_tokens[self._token]

    def _write_user(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, None, "You must be authenticated to do this")
        return user

    def _repo(self, repo_id: str, content: bool = False) -> Repo:
        """The repo, if the caller may read it (``content``: file contents, which gating protects)."""
        user = self._user()
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, "RepoNotFound", f"Repository not found: {repo_id}")
        if content and repo.gated and user is None:
            raise HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                             "and be authenticated to access it. Please log in.")
        return repo

    def _flag(self, name: str) -> bool:
        return self._query.get(name, "").lower() in ("1", "true")

    def _json(self) -> dict:
        return json.loads(self._body or b"{}")

    # -- read endpoints ---------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._write_user()
        self._send(200, {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                         "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}})

    def _model_info(self, repo_id: str, rest: list[str]) -> None:
        repo = self._repo(repo_id)
        with self.hub._lock:
            info = self.hub._model_info(repo, self.hub._rev(repo, "/".join(rest) or "main"), self._flag("blobs"))
        self._send(200, info)

    def _tree(self, repo_id: str, rest: list[str]) -> None:
        repo = self._repo(repo_id)
        with self.hub._lock:
            commit = self.hub._rev(repo, rest[0] if rest else "main")
        entries = self.hub._tree(commit, "/".join(rest[1:]).strip("/"), self._flag("recursive"))
        # Cursor pagination with a GitHub-style Link header, which the client follows as is.
        start, size, headers = int(self._query.get("cursor", 0)), self.hub.tree_page_size, {}
        if start + size < len(entries):
            query = urlencode({**self._query, "cursor": start + size})
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._send(200, entries[start:start + size], headers)

    def _refs(self, repo_id: str, rest: list[str]) -> None:
        repo = self._repo(repo_id)
        with self.hub._lock:
            refs = {kind: [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": sha} for n, sha in items.items()]
                    for kind, prefix, items in (("branches", "heads", repo.branches), ("tags", "tags", repo.tags))}
        self._send(200, {**refs, "converts": [], "pullRequests": []})

    def _commits(self, repo_id: str, rest: list[str]) -> None:
        self._repo(repo_id)
        commits = self.hub.commits(repo_id, "/".join(rest) or "main")[::-1]
        self._send(200, [{"id": c.sha, "title": c.title, "message": c.message, "authors": [{"user": c.author}],
                          "date": c.date} for c in commits])

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id, content=True)
        with self.hub._lock:
            commit = self.hub._rev(repo, rev)
        entry = commit.files.get(path)
        if entry is None:  # the client caches the absence of the file under this commit
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.oid if entry.lfs else entry.git_oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.oid}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        if (rng := self.headers.get("Range")) is not None:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2) or entry.size - 1), entry.size - 1)
            elif m and m.group(2):  # suffix range: the last N bytes
                start = max(entry.size - int(m.group(2)), 0)
            if not m or start > end:
                raise HubError(416, None, f"Range not satisfiable: {rng}", {"Content-Range": f"bytes */{entry.size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{entry.size}"
        if self.command == "HEAD":
            self._send(status, b"", headers, length=end - start + 1)
        else:
            self._send(status, self.hub._read(entry, start, end - start + 1), headers)

    # -- write endpoints --------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        user, payload = self._write_user(), self._json()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, None, "FakeHub only hosts model repos")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        with self.hub._lock:
            if repo_id in self.hub._repos:
                # create_repo(exist_ok=True) reads the url of the existing repo from this answer
                raise HubError(409, None, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
            self.hub._create_repo(repo_id, private=payload.get("visibility") == "private", gated=False)
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _preupload(self, repo_id: str, rest: list[str]) -> None:
        self._write_user()
        repo, payload = self._repo(repo_id), self._json()
        with self.hub._lock:
            commit = self.hub._rev(repo, "/".join(rest))
        ignored = [line.strip() for line in (payload.get("gitIgnore") or "").splitlines()
                   if line.strip() and not line.startswith("#")]
        files = []
        for f in payload["files"]:
            path, existing = f["path"], commit.files.get(f["path"])
            lfs = is_lfs(path, f["size"], base64.b64decode(f.get("sample", "")))
            # "oid" lets the client skip unchanged files: sha256 for LFS, git blob sha1 for regular files
            oid = None if existing is None else existing.oid if existing.lfs else existing.git_oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "oid": oid,
                          "shouldIgnore": any(fnmatch.fnmatch(path, pattern) for pattern in ignored)})
        self._send(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo_id: str) -> None:
        self._write_user()
        repo, payload = self._repo(repo_id), self._json()
        if payload.get("operation") != "upload":
            raise HubError(400, None, "FakeHub only supports LFS uploads")
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            with self.hub._lock:
                present = obj["oid"] in repo.lfs_objects
            if not present:  # no "actions": the client skips objects the server has
                # like a pre-signed URL, the href carries what the PUT must match: the oid and the size
                href = f"{self.hub.url}/lfs-upload/{repo_id}/{obj['oid']}?{urlencode({'size': obj['size']})}"
                item["actions"] = {"upload": {"href": href}}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, repo_id: str, oid: str) -> None:
        # The body was read in full (_read_body); it counts only if it is the object the batch call announced.
        size = self._query.get("size")
        if size is not None and len(self._body) != int(size):
            raise HubError(400, None, f"LFS object {oid} has {len(self._body)} bytes, {size} were announced")
        if hashlib.sha256(self._body).hexdigest() != oid:
            raise HubError(400, None, f"LFS object does not match its oid {oid}")
        with self.hub._lock:
            repo = self.hub._get_repo(repo_id)
            self.hub._store(self._body)
            repo.lfs_objects.add(oid)
        self._send(200)

    def _commit(self, repo_id: str, rest: list[str]) -> None:
        user, repo, branch = self._write_user(), self._repo(repo_id), "/".join(rest)
        if self._flag("create_pr"):
            raise HubError(400, None, "FakeHub does not support pull requests")
        lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "The commit payload must start with a header")
        header = lines[0]["value"]
        with self.hub._lock:
            if branch not in repo.branches:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            head = repo.commits[repo.branches[branch]]
            if header.get("parentCommit") and header["parentCommit"] != head.sha:
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for op in lines[1:]:
                key, value = op["key"], op["value"]
                path = value["path"]
                if key == "file":
                    files[path] = self.hub._entry(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in repo.lfs_objects:
                        raise HubError(400, None, f"LFS object {value['oid']} of {path} was never uploaded")
                    files[path] = self.hub._lfs_entry(value["oid"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, None, f"FakeHub does not support the commit operation {key!r}")
            sha = self.hub._new_commit(repo, branch, files, header["summary"], header.get("description", ""), user)
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}",
                         "hookOutput": "", "pullRequestUrl": None})

    def _branch(self, repo_id: str, rest: list[str]) -> None:
        self._write_user()
        repo, name = self._repo(repo_id), "/".join(rest)
        with self.hub._lock:
            if name in repo.branches:
                raise HubError(409, None, f"Reference already exists: refs/heads/{name}")
            repo.branches[name] = self.hub._rev(repo, self._json().get("startingPoint") or "main").sha
        self._send(200, {})

    def _tag(self, repo_id: str, rest: list[str]) -> None:
        self._write_user()
        repo, tag = self._repo(repo_id), self._json()["tag"]
        with self.hub._lock:
            if tag in repo.tags:
                raise HubError(409, None, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = self.hub._rev(repo, "/".join(rest)).sha
        self._send(200, {})


def use_fake_hub(monkeypatch, hub: FakeHub, home: str | Path) -> None:
    """Point the already-imported huggingface_hub of this process at ``hub`` for one pytest test, with HF_HOME moved
    to ``home`` (cache, token file) and no token unless the test sets HF_TOKEN afterwards. The environment variables
    of ``hub.client_env()`` and HF_HOME are set as well, for subprocesses."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager

    home = Path(home)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {**hub.client_env(), "HF_HOME": str(home)}.items():
        monkeypatch.setenv(var, value)
    patches = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", patches["HF_HUB_CACHE"])  # scan_cache_dir()'s default
    # Progress bars are quieted through a copy of the constant, made when huggingface_hub.utils.tqdm was imported.
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
