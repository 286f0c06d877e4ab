"""A Hugging Face Hub-compatible HTTP endpoint for tests (stdlib only).

Serves a folder as model repos: ``root/<org>/<name>/<files...>`` is the model repo ``"<org>/<name>"``
(files may sit in subfolders; symlinks are followed and report the real size).  It answers exactly the
routes ``huggingface_hub`` 2.4 uses to download (see shared/FACTS.md):

* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` -> model info
  (``id``, ``sha``, ``siblings``; ``?blobs=true`` adds ``size``/``blobId``/``lfs`` per sibling);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`` -> list of file/directory entries;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` -> the file (``ETag``, ``X-Repo-Commit``,
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Range`` -> 206).

Errors are 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``, which
``huggingface_hub`` maps to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` /
``RemoteEntryNotFoundError`` without retrying.  ``X-Xet-Hash`` is never sent, so downloads are plain HTTP.

Revisions: each repo has one commit whose sha is the sha1 of the repo id and its sorted
(path, size, mtime_ns) list: stable while the files are untouched, new when one changes.
``"main"`` and that sha resolve; anything else is ``RevisionNotFound``.

Test knobs (plain attributes, settable from any thread while the server runs):

* ``throttle_bytes_per_s``: ``None`` or a rate shared by all file bodies being streamed (it models the
  link: two parallel downloads share it), checked before every chunk, so a change applies at once;
* ``fail_after_bytes``: ``None`` or N: every file ``GET`` body is cut (socket shut down) after N bytes
  of that response: ``huggingface_hub`` then resumes with a ``Range`` request inside the same call;
* ``extra_info``: ``{repo_id: {...}}`` merged into that repo's model-info JSON (``gguf``, ``tags``...);
* ``listing_without_sizes``: a set of repo ids whose model info lists files without ``size``/``lfs``/``blobId``
  even with ``?blobs=true`` (as some mirrors do); the files themselves still carry ``Content-Length``.

Faults, one rule at a time (``fault()`` adds one, ``clear_faults()`` removes them all): the next ``times``
file GETs whose repo path ends with ``path_suffix`` (HEADs pass, so a client's metadata call
succeeds and its download meets the fault):

* ``fault(suffix, "status", status=503)``: answered with that status and a JSON error, no body;
* ``fault(suffix, "stall", after_bytes=K, stall_s=S)``: the body stops after K bytes for S seconds
  (a client with a shorter read timeout gives up and resumes with ``Range``), then goes on;
* ``fault(suffix, "reset", after_bytes=K)``: the connection is reset (RST) after K bytes of the body.

``faults_hit`` lists ``(kind, path, offset)`` for every fault served (``offset``: where the body began).

Request log: ``requests`` is a list of ``RequestRecord(method, path, range, bytes_sent)`` appended when
each request finishes (``path`` is the unquoted URL path without the query string; ``bytes_sent`` counts
body bytes); ``log`` has the same requests with status, query and timing.  ``get_count(suffix)`` and
``bytes_served(suffix)`` sum them up; ``live_bytes`` counts file-body bytes as they are sent.

Client side, ``with loopback_only_hf_client():`` patches huggingface_hub's import-time settings for a test
(no Xet, no telemetry, not offline) and refuses any request that would leave the loopback: with telemetry
on, huggingface_hub 2.4 fetches ``huggingface.co/api/agent-harnesses`` once per process even when every
call passes ``endpoint=``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "HFEndpoint",
    "loopback_only_hf_client",
    "RequestRecord",
    "RequestLogEntry",
    "LFS_THRESHOLD",
    "LFS_SUFFIXES",
    "file_sha256",
    "git_blob_sha1",
]

#: Files this big or bigger are served as Git LFS files (ETag = sha256, ``lfs`` in the tree listing).
LFS_THRESHOLD = 10 * 1024 * 1024
#: Files with these suffixes are LFS files whatever their size (as the Hub's default .gitattributes does).
LFS_SUFFIXES = (
    ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
    ".npy", ".npz", ".pkl", ".pickle", ".tflite", ".ot", ".model", ".zip", ".tar", ".gz", ".zst",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_DISCONNECT_ERRORS = (ConnectionError, TimeoutError)  # BrokenPipe, ConnectionReset, ConnectionAborted...
_UNTHROTTLED_CHUNK = 4 * 1024 * 1024
_THROTTLED_CHUNK = 256 * 1024


# --------------------------------------------------------------------------------------------------
# Hashing, lazily and once per file version (the test model is 253 MB).
# --------------------------------------------------------------------------------------------------

_digest_cache: dict[tuple, str] = {}
_digest_locks: dict[tuple, threading.Lock] = {}
_digest_guard = threading.Lock()


def _file_key(path: Path, kind: str) -> tuple:
    st = os.stat(path)  # follows symlinks
    # Hard links share the inode, so the gemma file linked into many test repos is hashed once.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, kind)


def _cached_digest(path: Path, kind: str) -> str:
    key = _file_key(path, kind)
    cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    with _digest_guard:
        lock = _digest_locks.setdefault(key, threading.Lock())
    with lock:  # two requests for the same new file hash it once
        cached = _digest_cache.get(key)
        if cached is None:
            if kind == "sha256":
                with open(path, "rb") as fh:
                    cached = hashlib.file_digest(fh, "sha256").hexdigest()
            else:  # git blob sha1: sha1(b"blob <size>\0" + content)
                digest = hashlib.sha1(b"blob %d\0" % key[2])
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                cached = digest.hexdigest()
            _digest_cache[key] = cached
    return cached


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file, cached per (real path, inode, size, mtime): cheap to call again."""
    return _cached_digest(Path(path), "sha256")


def git_blob_sha1(path: str | os.PathLike) -> str:
    """Git blob id of a file (what the Hub reports as ``oid``/ETag of a non-LFS file), cached."""
    return _cached_digest(Path(path), "gitsha1")


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --------------------------------------------------------------------------------------------------
# Repos on disk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    path: str  # repo-relative, "/"-separated
    abspath: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    folder: Path
    files: dict[str, _File]
    dirs: frozenset[str]
    sha: str
    last_modified: datetime


class RequestRecord(NamedTuple):
    """One finished request, unpackable as ``(method, path, range, bytes_sent)``."""

    method: str
    path: str
    range: str | None
    bytes_sent: int


class RequestLogEntry(NamedTuple):
    method: str
    path: str
    query: str
    range: str | None
    status: int
    bytes_sent: int
    started: float  # time.monotonic()
    finished: float


@dataclass
class _Fault:
    path_suffix: str
    kind: str            # "status" | "stall" | "reset"
    times: int
    after_bytes: int = 0
    status: int = 503
    stall_s: float = 0.0


class _HTTPError(Exception):
    def __init__(self, status: int, error_code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.commit = commit


def _repo_not_found(repo_id: str) -> _HTTPError:
    return _HTTPError(404, "RepoNotFound", f"Repository not found: {repo_id}")


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not make stop() wait
    allow_reuse_address = True

    endpoint: "HFEndpoint"

    def handle_error(self, request, client_address):  # noqa: D401 - stdlib hook
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECT_ERRORS) or self.endpoint._stopping:
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PortenTestHub/1.0"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is closed after this

    server: _Server

    # --- plumbing ------------------------------------------------------------------------------

    def log_message(self, format, *args):  # silence the default stderr logging
        pass

    def setup(self):
        super().setup()
        self.server.endpoint._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        except _DISCONNECT_ERRORS:
            pass
        finally:
            self.server.endpoint._track(self.connection, False)

    def handle(self):
        try:
            super().handle()
        except _DISCONNECT_ERRORS:
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    # --- request handling ----------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        ep = self.server.endpoint
        started = time.monotonic()
        split = urlsplit(self.path)
        path = unquote(split.path)
        range_header = self.headers.get("Range")
        self._status = 0
        self._sent = 0
        try:
            self._drain_request_body()
            self._route(method, split.path, parse_qs(split.query))
        except _HTTPError as err:
            self._send_error_response(method, err)
        except _DISCONNECT_ERRORS:
            self.close_connection = True
        except Exception as exc:  # a bug here should show up as a 500, not a hung client
            try:
                self._send_error_response(method, _HTTPError(500, None, f"{type(exc).__name__}: {exc}"))
            except _DISCONNECT_ERRORS:
                self.close_connection = True
            raise
        finally:
            ep._record(
                RequestLogEntry(
                    method, path, split.query, range_header, self._status, self._sent, started, time.monotonic()
                )
            )

    def _drain_request_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            block = self.rfile.read(min(length, 1 << 16))
            if not block:
                break
            length -= len(block)

    def _route(self, method: str, raw_path: str, query: dict[str, list[str]]) -> None:
        ep = self.server.endpoint
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        if method not in ("GET", "HEAD"):
            raise _HTTPError(405, None, f"{method} is not supported by the test hub")
        if len(segs) >= 4 and segs[0] == "api" and segs[1] == "models":
            repo = ep._repo(segs[2], segs[3])
            rest = segs[4:]
            if not rest or rest == [""]:
                return self._send_model_info(method, repo, "main", query)
            if rest[0] == "revision" and len(rest) >= 2:
                return self._send_model_info(method, repo, "/".join(rest[1:]), query)
            if rest[0] == "tree" and len(rest) >= 2:
                sub = "/".join(s for s in rest[2:] if s)
                return self._send_tree(method, repo, rest[1], sub, query)
            raise _HTTPError(404, None, f"Unknown API route: {raw_path}")
        if len(segs) >= 2 and segs[0] == "api" and segs[1] in ("datasets", "spaces", "kernels"):
            raise _repo_not_found("/".join(segs[2:4]))
        if len(segs) >= 5 and segs[2] == "resolve":
            if segs[0] in ("datasets", "spaces", "kernels"):
                raise _repo_not_found("/".join(segs[1:3]))
            repo = ep._repo(segs[0], segs[1])
            return self._send_file(method, repo, segs[3], "/".join(segs[4:]))
        if len(segs) >= 5 and segs[0] in ("datasets", "spaces", "kernels") and segs[3] == "resolve":
            raise _repo_not_found("/".join(segs[1:3]))
        raise _HTTPError(404, None, f"Not found: {raw_path}")

    # --- responses -----------------------------------------------------------------------------

    def _send_bytes(self, method: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)
            self._sent = len(body)

    def _send_json(self, method: str, payload, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send_bytes(method, 200, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def _send_error_response(self, method: str, err: _HTTPError) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": err.message}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send_bytes(method, err.status, json.dumps({"error": err.message}).encode(), headers)

    def _send_model_info(self, method: str, repo: _Repo, revision: str, query) -> None:
        ep = self.server.endpoint
        ep._check_revision(repo, revision)
        blobs = _truthy(query.get("blobs")) and repo.repo_id not in ep.listing_without_sizes
        siblings = []
        for f in repo.files.values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                entry = ep._file_entry(f)
                sibling["size"] = entry["size"]
                sibling["blobId"] = entry["oid"]
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        stamp = repo.last_modified.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        org = repo.repo_id.split("/")[0]
        info = {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": org,
            "sha": repo.sha,
            "lastModified": stamp,
            "createdAt": stamp,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        info.update(ep.extra_info.get(repo.repo_id, {}))
        self._send_json(method, info)

    def _send_tree(self, method: str, repo: _Repo, revision: str, sub: str, query) -> None:
        ep = self.server.endpoint
        ep._check_revision(repo, revision)
        recursive = _truthy(query.get("recursive"))
        if sub and sub not in repo.dirs:
            raise _HTTPError(404, "EntryNotFound", f"{sub} does not exist on revision {revision}", repo.sha)
        prefix = f"{sub}/" if sub else ""

        def wanted(p: str) -> bool:
            if not p.startswith(prefix):
                return False
            return recursive or "/" not in p[len(prefix):]

        entries: list[dict] = []
        for d in sorted(repo.dirs):
            if d and wanted(d):
                oid = hashlib.sha1(f"tree {repo.sha} {d}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        for f in repo.files.values():
            if wanted(f.path):
                entries.append(ep._file_entry(f))
        self._send_json(method, entries)

    def _send_file(self, method: str, repo: _Repo, revision: str, path: str) -> None:
        ep = self.server.endpoint
        ep._check_revision(repo, revision)
        f = repo.files.get(path)
        if f is None:
            raise _HTTPError(404, "EntryNotFound", f"{path} does not exist on revision {revision}", repo.sha)
        fault = ep._take_fault(path) if method == "GET" else None
        if fault is not None and fault.kind == "status":
            ep._fault_hit(fault.kind, path, 0)
            raise _HTTPError(fault.status, None, f"the test hub was told to answer {fault.status}")
        size = os.stat(f.abspath).st_size
        lfs = ep._is_lfs(f)
        etag = file_sha256(f.abspath) if lfs else git_blob_sha1(f.abspath)
        name = path.rsplit("/", 1)[-1]
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{etag}"',
            "X-Repo-Commit": repo.sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
            "Cache-Control": "public, max-age=31536000",
        }
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(size)

        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header is not None:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                self._status = 416
                self.send_response(416)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)

        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        self.wfile.flush()
        if fault is not None:
            ep._fault_hit(fault.kind, path, start)
        self._stream(f.abspath, start, length, fault)

    def _stream(self, abspath: Path, start: int, length: int, fault: _Fault | None = None) -> None:
        ep = self.server.endpoint
        sock = self.connection
        fail_after = ep.fail_after_bytes
        if fault is not None and fault.kind == "reset":
            fail_after = fault.after_bytes if fail_after is None else min(fail_after, fault.after_bytes)
        stall_at = fault.after_bytes if fault is not None and fault.kind == "stall" else None
        remaining = length
        offset = start
        with open(abspath, "rb") as fh:
            while remaining > 0:
                rate = ep.throttle_bytes_per_s
                if rate:
                    chunk = int(min(_THROTTLED_CHUNK, max(4096, rate / 20)))
                else:
                    chunk = _UNTHROTTLED_CHUNK
                chunk = min(chunk, remaining)
                if stall_at is not None and self._sent + chunk >= stall_at:
                    chunk = max(0, stall_at - self._sent)
                    if not chunk:
                        stall_at = None
                        time.sleep(fault.stall_s)
                        continue
                cut = fail_after is not None and self._sent + chunk >= fail_after
                if cut:
                    chunk = max(0, fail_after - self._sent)
                if chunk:
                    if rate:
                        ep._throttle(chunk, rate)
                    sent = sock.sendfile(fh, offset, chunk)
                    if sent <= 0:
                        raise ConnectionResetError("sendfile sent nothing")
                    offset += sent
                    remaining -= sent
                    self._sent += sent
                    ep._add_live(sent)
                if cut:
                    if fault is not None and fault.kind == "reset":
                        self._reset_connection()
                    else:
                        self._abort_connection()
                    return

    def _reset_connection(self) -> None:
        """Reset the connection mid-body (RST): the client reads ECONNRESET (httpx: ReadError)."""
        self.close_connection = True
        try:
            # Linger on with a zero timeout: close() discards the unsent data and sends a RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _abort_connection(self) -> None:
        """Drop the connection mid-body, as a flaky network would."""
        # A FIN, not a RST: the client sees a short body (httpx: RemoteProtocolError), which
        # huggingface_hub retries with a Range request; a reset would be a ReadError it does not retry.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].strip().lower() in ("1", "true", "yes", "on")


def _parse_range(header: str, size: int):
    """``(start, end)`` inclusive, ``None`` to ignore the header (serve 200), or ``"unsatisfiable"``."""
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: ignoring Range is allowed
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    end = min(end, size - 1)
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end


# --------------------------------------------------------------------------------------------------
# Public class
# --------------------------------------------------------------------------------------------------


class HFEndpoint:
    """A local Hugging Face Hub serving ``root/<org>/<name>/...`` as model repos.

    >>> with HFEndpoint(root) as hub:
    ...     snapshot_download("org/name", endpoint=hub.url, cache_dir=tmp)
    """

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 lfs_threshold: int = LFS_THRESHOLD):
        self.root = Path(root)
        self.host = host
        self.port = port
        self.lfs_threshold = lfs_threshold
        self.throttle_bytes_per_s: float | None = None
        self.fail_after_bytes: int | None = None
        self.extra_info: dict[str, dict] = {}
        self.listing_without_sizes: set[str] = set()
        self.faults: list[_Fault] = []
        self.faults_hit: list[tuple[str, str, int]] = []
        self.requests: list[RequestRecord] = []
        self.log: list[RequestLogEntry] = []
        self.live_bytes = 0
        self._lock = threading.Lock()
        self._throttle_lock = threading.Lock()
        self._throttle_next = 0.0
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "HFEndpoint":
        if self._server is not None:
            return self
        self._stopping = False
        server = _Server((self.host, self.port), _Handler)
        server.endpoint = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"HFEndpoint:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.shutdown()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:  # wake handler threads parked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "HFEndpoint":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HFEndpoint is not started")
        return f"http://{self.host}:{self.port}"

    # --- repos ---------------------------------------------------------------------------------

    def repo_folder(self, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        return self.root / org / name

    def commit_sha(self, repo_id: str) -> str:
        """The sha that ``main`` resolves to for this repo right now."""
        org, name = repo_id.split("/")
        try:
            return self._repo(org, name).sha
        except _HTTPError:
            raise KeyError(f"no repo folder for {repo_id!r} under {self.root}") from None

    def _repo(self, org: str, name: str) -> _Repo:
        repo_id = f"{org}/{name}"
        if not (_NAME_RE.match(org) and _NAME_RE.match(name)):
            raise _repo_not_found(repo_id)
        folder = self.root / org / name
        if not folder.is_dir():
            raise _repo_not_found(repo_id)
        files: dict[str, _File] = {}
        dirs: set[str] = {""}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            rel_dir = Path(dirpath).relative_to(folder).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir
            if rel_dir:
                dirs.add(rel_dir)
            for fn in sorted(filenames):
                abspath = Path(dirpath) / fn
                try:
                    st = os.stat(abspath)
                except OSError:  # dangling symlink
                    continue
                rel = f"{rel_dir}/{fn}" if rel_dir else fn
                files[rel] = _File(rel, abspath, st.st_size, st.st_mtime_ns)
        files = dict(sorted(files.items()))
        fingerprint = "\n".join([repo_id, *(f"{f.path}\t{f.size}\t{f.mtime_ns}" for f in files.values())])
        sha = hashlib.sha1(fingerprint.encode()).hexdigest()
        newest = max((f.mtime_ns for f in files.values()), default=os.stat(folder).st_mtime_ns)
        last_modified = datetime.fromtimestamp(newest / 1e9, tz=timezone.utc)
        return _Repo(repo_id, folder, files, frozenset(dirs), sha, last_modified)

    def _check_revision(self, repo: _Repo, revision: str) -> None:
        if revision not in ("main", repo.sha):
            raise _HTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _is_lfs(self, f: _File) -> bool:
        return f.size >= self.lfs_threshold or f.path.lower().endswith(LFS_SUFFIXES)

    def _file_entry(self, f: _File) -> dict:
        if self._is_lfs(f):
            sha256 = file_sha256(f.abspath)
            pointer = _lfs_pointer(sha256, f.size)
            oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
            return {
                "type": "file",
                "oid": oid,
                "size": f.size,
                "path": f.path,
                "lfs": {"oid": sha256, "size": f.size, "pointerSize": len(pointer)},
            }
        return {"type": "file", "oid": git_blob_sha1(f.abspath), "size": f.size, "path": f.path}

    # --- faults -------------------------------------------------------------------------------

    def fault(self, path_suffix: str, kind: str, *, times: int = 1, after_bytes: int = 0, status: int = 503,
              stall_s: float = 0.0) -> None:
        """Make the next `times` file GETs whose path ends with `path_suffix` meet a fault (see the module doc)."""
        if kind not in ("status", "stall", "reset"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self.faults.append(_Fault(path_suffix, kind, times, after_bytes, status, stall_s))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            self.faults_hit.clear()

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and path.endswith(fault.path_suffix):
                    fault.times -= 1
                    return fault
        return None

    def _fault_hit(self, kind: str, path: str, offset: int) -> None:
        with self._lock:
            self.faults_hit.append((kind, path, offset))

    # --- throttling ----------------------------------------------------------------------------

    def _throttle(self, nbytes: int, rate: float) -> None:
        """Wait for this chunk's slot: one rate shared by every body being streamed."""
        with self._throttle_lock:
            now = time.monotonic()
            begin = max(now, self._throttle_next)
            self._throttle_next = begin + nbytes / rate
            wake = self._throttle_next
        delay = wake - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _add_live(self, n: int) -> None:
        with self._lock:
            self.live_bytes += n

    # --- request log ---------------------------------------------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _record(self, entry: RequestLogEntry) -> None:
        with self._lock:
            self.log.append(entry)
            self.requests.append(RequestRecord(entry.method, entry.path, entry.range, entry.bytes_sent))

    def request_list(self) -> list[RequestRecord]:
        """A copy of ``requests`` taken under the lock."""
        with self._lock:
            return list(self.requests)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.log.clear()

    def get_count(self, path_suffix: str = "", method: str | None = "GET") -> int:
        """Number of finished requests of ``method`` (``None``: any) whose path ends with ``path_suffix``."""
        return sum(
            1
            for r in self.request_list()
            if r.path.endswith(path_suffix) and (method is None or r.method == method)
        )

    def bytes_served(self, path_suffix: str | None = None) -> int:
        """Body bytes sent by finished requests (whose path ends with ``path_suffix``, if given)."""
        return sum(r.bytes_sent for r in self.request_list() if path_suffix is None or r.path.endswith(path_suffix))


# --------------------------------------------------------------------------------------------------
# Client side: keep huggingface_hub on the loopback
# --------------------------------------------------------------------------------------------------

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@contextmanager
def loopback_only_hf_client() -> Iterator[list[str]]:
    """Make sure huggingface_hub stays on the loopback while it talks to an ``HFEndpoint``.

    huggingface_hub reads its settings from the environment once, at import, so the test run sets
    them before anything imports it (tests/services_plugin.py): ``HF_HUB_DISABLE_XET`` (plain HTTP
    downloads), ``HF_HUB_DISABLE_TELEMETRY`` (otherwise the first request of a process fetches
    ``{constants.ENDPOINT}/api/agent-harnesses``, huggingface.co whatever ``endpoint=`` says) and
    no ``HF_HUB_OFFLINE`` (which blocks the local hub too). This checks they took, and adds a request
    hook (httpx's public event hooks) to the shared client that refuses any request off the loopback.
    Yields the list of refused URLs; exiting raises ``AssertionError`` if it is not empty.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    wrong = [name for name, wanted in (("HF_HUB_DISABLE_XET", True), ("HF_HUB_DISABLE_TELEMETRY", True),
                                       ("HF_HUB_OFFLINE", False)) if getattr(constants, name) != wanted]
    assert not wrong, f"huggingface_hub was imported before the test run set {wrong} (tests/services_plugin.py)"
    refused: list[str] = []

    def loopback_only(request):
        if request.url.host not in _LOOPBACK_HOSTS:
            refused.append(str(request.url))
            raise RuntimeError(f"huggingface_hub tried to reach {request.url} during a test")

    session = get_session()
    saved_hooks = {k: list(v) for k, v in session.event_hooks.items()}
    session.event_hooks = {**saved_hooks, "request": [*saved_hooks.get("request", []), loopback_only]}
    try:
        yield refused
    finally:
        session.event_hooks = saved_hooks
    assert not refused, f"huggingface_hub left the loopback: {refused}"
