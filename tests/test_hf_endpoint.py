"""huggingface_hub 2.4 against the local test hub (tests/support/hf_endpoint.py), with the real Gemma GGUF.

Plain pytest, no Django:  .venv/bin/python -m pytest -p no:django tests/test_hf_endpoint.py -q
Nothing here reaches huggingface.co: every call passes ``endpoint=`` explicitly (HF_ENDPOINT is read at
import time) and a guard fails any request that huggingface_hub would send off the loopback.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import itertools
import os
import socket
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # read when huggingface_hub is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # see loopback_only_hf_client()

import pytest  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm  # noqa: E402

from tests.support.hf_endpoint import HFEndpoint, git_blob_sha1, loopback_only_hf_client  # noqa: E402
from tests.support.small_model import (  # noqa: E402
    GEMMA_GGUF_SHA256,
    GEMMA_GGUF_SIZE,
    gemma_gguf_path,
    make_hf_repo,
)

REPO = "porten-test/gemma-3-270m-GGUF"
GGUF = "gemma-3-270m-q4_k_m.gguf"
SYM_REPO = "porten-test/symlinked"
CONFIG = b'{"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}\n'
README = b"# Gemma 3 270M Q4_K_M\n\nServed by the Porten test hub.\n"
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}\n'


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf() -> Path:
    return gemma_gguf_path()


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, gguf) -> Path:
    root = tmp_path_factory.mktemp("hub")
    make_hf_repo(root, REPO, {GGUF: gguf, "config.json": CONFIG, "README.md": README})
    src = tmp_path_factory.mktemp("src") / "tokenizer.json"
    src.write_bytes(TOKENIZER)
    make_hf_repo(root, SYM_REPO, {"weights/model.gguf": gguf, "tokenizer.json": src}, link="symlink")
    return root


@pytest.fixture
def hub(hub_root):
    # Patches huggingface_hub's import-time settings (no Xet, no telemetry fetch from huggingface.co, not
    # offline) and fails the test if any request leaves the loopback.
    with loopback_only_hf_client():
        with HFEndpoint(hub_root) as endpoint:
            yield endpoint


def sha256_of(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def assert_is_gemma(path) -> None:
    assert os.path.getsize(path) == GEMMA_GGUF_SIZE
    assert sha256_of(path) == GEMMA_GGUF_SHA256


def recording_tqdm():
    """A tqdm class (fresh per test) whose bars record every update() call."""

    class RecordingTqdm(tqdm):
        bars: list["RecordingTqdm"] = []

        def __init__(self, *args, **kwargs):
            self.increments: list[int] = []
            self.first_desc = kwargs.get("desc")
            kwargs["file"] = io.StringIO()  # keep the bars out of the test output
            super().__init__(*args, **kwargs)
            type(self).bars.append(self)

        def update(self, n=1):
            self.increments.append(n)
            return super().update(n)

    return RecordingTqdm


def assert_grows_to(bar, size: int) -> None:
    assert bar.increments, f"bar {bar.first_desc!r} saw no update"
    assert all(n > 0 for n in bar.increments), bar.increments  # strictly growing byte count
    totals = list(itertools.accumulate(bar.increments))
    assert totals[-1] == size
    assert bar.total == size


def file_gets(hub: HFEndpoint, name: str):
    return [r for r in hub.request_list() if r.method == "GET" and r.path.endswith("/" + name)]


# ------------------------------------------------------------------------------------------------
# downloads
# ------------------------------------------------------------------------------------------------


def test_snapshot_download_is_byte_identical(hub, tmp_path):
    bar_class = recording_tqdm()
    folder = snapshot_download(
        REPO, revision="main", allow_patterns=["*.gguf"], cache_dir=tmp_path, endpoint=hub.url, tqdm_class=bar_class
    )
    folder = Path(folder)
    sha = hub.commit_sha(REPO)
    assert folder == tmp_path / "models--porten-test--gemma-3-270m-GGUF" / "snapshots" / sha
    assert sorted(p.name for p in folder.iterdir()) == [GGUF]
    assert_is_gemma(folder / GGUF)
    # LFS file => ETag is the sha256 => that is the blob's name in the cache.
    assert (folder / GGUF).resolve() == (tmp_path / "models--porten-test--gemma-3-270m-GGUF" / "blobs" / GEMMA_GGUF_SHA256)
    assert (folder.parent.parent / "refs" / "main").read_text() == sha

    gets = file_gets(hub, GGUF)
    assert [(g.range, g.bytes_sent) for g in gets] == [(None, GEMMA_GGUF_SIZE)]
    assert hub.get_count("README.md", method=None) == 0 and hub.get_count("config.json", method=None) == 0

    # snapshot_download's byte bars ("Downloading bytes", "Reconstructing") each reach the full size.
    byte_bars = [b for b in bar_class.bars if b.unit == "B"]
    assert len(byte_bars) == 2, [b.first_desc for b in bar_class.bars]
    for bar in byte_bars:
        assert_grows_to(bar, GEMMA_GGUF_SIZE)


def test_repeat_snapshot_download_is_served_from_cache(hub, tmp_path):
    kwargs = dict(revision="main", allow_patterns=["*.gguf"], cache_dir=tmp_path, endpoint=hub.url)
    first = snapshot_download(REPO, **kwargs)
    assert hub.bytes_served(GGUF) == GEMMA_GGUF_SIZE

    hub.clear_requests()
    again = snapshot_download(REPO, **kwargs)
    assert again == first
    # One request: the branch is resolved again; the tree listing and the file come from the cache.
    assert [(r.method, r.path) for r in hub.request_list()] == [("GET", f"/api/models/{REPO}/revision/main")]

    # The snapshot's link is gone but the blob is kept: it is relinked, the file is not fetched again.
    (Path(first) / GGUF).unlink()
    hub.clear_requests()
    repaired = snapshot_download(REPO, **kwargs)
    assert repaired == first
    assert_is_gemma(Path(repaired) / GGUF)
    assert hub.get_count(GGUF) == 0
    assert hub.bytes_served() < 10_000


def test_hf_hub_download_with_progress(hub, tmp_path):
    bar_class = recording_tqdm()
    path = hf_hub_download(REPO, GGUF, cache_dir=tmp_path, endpoint=hub.url, tqdm_class=bar_class)
    assert_is_gemma(path)
    assert len(bar_class.bars) == 1
    bar = bar_class.bars[0]
    assert_grows_to(bar, GEMMA_GGUF_SIZE)
    assert len(bar.increments) >= 20  # ~10 MiB chunks: the caller sees the download move

    # A small (non-LFS) file: ETag is its git blob sha1, which names the blob.
    config = Path(hf_hub_download(REPO, "config.json", cache_dir=tmp_path, endpoint=hub.url))
    assert config.read_bytes() == CONFIG
    assert config.resolve().name == hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()


def test_throttle_slows_download(hub, tmp_path):
    hub.throttle_bytes_per_s = 50_000_000
    start = time.monotonic()
    path = hf_hub_download(REPO, GGUF, cache_dir=tmp_path, endpoint=hub.url)
    elapsed = time.monotonic() - start
    assert_is_gemma(path)
    # 253 MB at 50 MB/s is 5.06 s; the shared token bucket cannot send faster than that.
    assert 4.0 <= elapsed < 60, elapsed


def test_throttle_can_change_mid_download(hub, tmp_path):
    hub.throttle_bytes_per_s = 2_000_000  # would take ~2 minutes for the whole file
    result: dict = {}

    def download():
        try:
            result["path"] = hf_hub_download(REPO, GGUF, cache_dir=tmp_path, endpoint=hub.url)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while hub.live_bytes < 500_000 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)
    sent_while_throttled = hub.live_bytes
    assert 500_000 <= sent_while_throttled < 6_000_000, sent_while_throttled
    hub.throttle_bytes_per_s = None  # lifted while the body is streaming
    worker.join(timeout=40)
    assert not worker.is_alive(), "download did not speed up after the throttle was lifted"
    assert "error" not in result, result.get("error")
    assert_is_gemma(result["path"])
    assert len(file_gets(hub, GGUF)) == 1  # the same response, not a retry


def test_dropped_connection_is_resumed_with_range(hub, tmp_path):
    hub.fail_after_bytes = 100_000_000  # every file body is cut after 100 MB
    path = hf_hub_download(REPO, GGUF, cache_dir=tmp_path, endpoint=hub.url)
    assert_is_gemma(path)
    gets = file_gets(hub, GGUF)
    assert len(gets) == 3, gets
    assert gets[0].range is None and gets[0].bytes_sent == 100_000_000
    assert all(g.range and g.range.startswith("bytes=") and g.range.endswith("-") for g in gets[1:]), gets
    assert hub.bytes_served(GGUF) >= GEMMA_GGUF_SIZE


# ------------------------------------------------------------------------------------------------
# raw HTTP: ranges, keep-alive, disconnects
# ------------------------------------------------------------------------------------------------


def test_range_requests_and_keep_alive(hub, gguf):
    data_head = gguf.read_bytes()[:4096]
    with open(gguf, "rb") as fh:
        fh.seek(GEMMA_GGUF_SIZE - 24)
        data_tail = fh.read()
        fh.seek(1000)
        data_mid = fh.read(1000)
    sha = hub.commit_sha(REPO)
    url_path = f"/{REPO}/resolve/main/{GGUF}"
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)

    def request(method, path, range_header=None):
        conn.request(method, path, headers={"Range": range_header} if range_header else {})
        resp = conn.getresponse()
        return resp, resp.read()

    resp, body = request("HEAD", url_path)
    first_socket = conn.sock
    assert resp.status == 200 and body == b""
    assert resp.getheader("ETag") == f'"{GEMMA_GGUF_SHA256}"'
    assert resp.getheader("X-Linked-Etag") == f'"{GEMMA_GGUF_SHA256}"'
    assert resp.getheader("X-Linked-Size") == str(GEMMA_GGUF_SIZE)
    assert resp.getheader("Content-Length") == str(GEMMA_GGUF_SIZE)
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert resp.getheader("X-Repo-Commit") == sha
    assert resp.getheader("X-Xet-Hash") is None

    resp, body = request("GET", url_path, "bytes=0-15")
    assert resp.status == 206 and body == data_head[:16] and body.startswith(b"GGUF")
    assert resp.getheader("Content-Range") == f"bytes 0-15/{GEMMA_GGUF_SIZE}"

    resp, body = request("GET", f"/{REPO}/resolve/{sha}/{GGUF}", "bytes=1000-1999")
    assert resp.status == 206 and body == data_mid

    resp, body = request("GET", url_path, f"bytes={GEMMA_GGUF_SIZE - 24}-")
    assert resp.status == 206 and body == data_tail
    assert resp.getheader("Content-Range") == f"bytes {GEMMA_GGUF_SIZE - 24}-{GEMMA_GGUF_SIZE - 1}/{GEMMA_GGUF_SIZE}"

    resp, body = request("GET", url_path, "bytes=-10")
    assert resp.status == 206 and body == data_tail[-10:]

    resp, body = request("GET", url_path, f"bytes={GEMMA_GGUF_SIZE}-")
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{GEMMA_GGUF_SIZE}"

    resp, body = request("GET", f"/{REPO}/resolve/main/config.json")
    assert resp.status == 200 and body == CONFIG
    assert resp.getheader("ETag") == f'"{git_blob_sha1(hub.repo_folder(REPO) / "config.json")}"'
    assert resp.getheader("X-Linked-Etag") is None

    assert conn.sock is first_socket  # every request above went over one keep-alive connection
    conn.close()

    ranges = [(r.range, r.bytes_sent) for r in hub.request_list() if r.method == "GET" and r.path.endswith(GGUF)]
    assert ranges == [
        ("bytes=0-15", 16),
        ("bytes=1000-1999", 1000),
        (f"bytes={GEMMA_GGUF_SIZE - 24}-", 24),
        ("bytes=-10", 10),
        (f"bytes={GEMMA_GGUF_SIZE}-", 0),
    ]


def test_client_disconnect_mid_body(hub, capfd):
    hub.throttle_bytes_per_s = 20_000_000
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as sock:
        sock.sendall(f"GET /{REPO}/resolve/main/{GGUF} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 300_000:
            received += len(sock.recv(65536))
    deadline = time.monotonic() + 10
    while hub.get_count(GGUF) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    [record] = file_gets(hub, GGUF)
    assert 0 < record.bytes_sent < GEMMA_GGUF_SIZE
    hub.throttle_bytes_per_s = None
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    conn.request("HEAD", f"/{REPO}/resolve/main/{GGUF}")
    assert conn.getresponse().status == 200  # the server is still fine
    conn.close()
    assert "Traceback" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------
# errors: the right huggingface_hub exception, quickly (a 404 is not retried)
# ------------------------------------------------------------------------------------------------


def test_errors_map_to_hub_exceptions_quickly(hub, tmp_path):
    kw = dict(cache_dir=tmp_path, endpoint=hub.url)
    start = time.monotonic()
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("nobody/nothing", **kw)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "model.gguf", **kw)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9", **kw)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="0123456789abcdef0123456789abcdef01234567", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, GGUF, revision="v9", **kw)
    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(REPO, "missing.safetensors", **kw)
    assert isinstance(excinfo.value, RemoteEntryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info("nobody/nothing")
    assert time.monotonic() - start < 5
    assert hub.get_count(GGUF) == 0 and hub.bytes_served(GGUF) == 0  # HEADs only: nothing was downloaded


# ------------------------------------------------------------------------------------------------
# API routes, symlinked files
# ------------------------------------------------------------------------------------------------


def test_tree_and_model_info_follow_symlinks(hub, tmp_path):
    api = HfApi(endpoint=hub.url)
    sha = hub.commit_sha(SYM_REPO)
    assert (hub.repo_folder(SYM_REPO) / "weights" / "model.gguf").is_symlink()

    tree = {e.path: e for e in api.list_repo_tree(SYM_REPO, recursive=True)}
    assert sorted(tree) == ["tokenizer.json", "weights", "weights/model.gguf"]
    gguf_entry = tree["weights/model.gguf"]
    assert gguf_entry.size == GEMMA_GGUF_SIZE  # the target's size, not the link's
    assert gguf_entry.lfs.sha256 == GEMMA_GGUF_SHA256 and gguf_entry.lfs.size == GEMMA_GGUF_SIZE
    assert gguf_entry.lfs.pointer_size == 134
    assert tree["tokenizer.json"].lfs is None and tree["tokenizer.json"].size == len(TOKENIZER)
    assert tree["tokenizer.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(TOKENIZER) + TOKENIZER).hexdigest()
    assert not hasattr(tree["weights"], "size")  # a RepoFolder

    top = sorted(e.path for e in api.list_repo_tree(SYM_REPO, revision=sha))
    assert top == ["tokenizer.json", "weights"]
    sub = [e.path for e in api.list_repo_tree(SYM_REPO, path_in_repo="weights")]
    assert sub == ["weights/model.gguf"]

    info = api.model_info(SYM_REPO, files_metadata=True)
    assert info.id == SYM_REPO and info.sha == sha
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["weights/model.gguf"].lfs.sha256 == GEMMA_GGUF_SHA256
    assert siblings["tokenizer.json"].size == len(TOKENIZER)

    hub.extra_info[SYM_REPO] = {"pipeline_tag": "text-generation", "tags": ["gguf"]}
    info = api.model_info(SYM_REPO, revision=sha)
    assert info.pipeline_tag == "text-generation" and info.tags == ["gguf"]

    tokenizer = hf_hub_download(SYM_REPO, "tokenizer.json", cache_dir=tmp_path, endpoint=hub.url)
    assert Path(tokenizer).read_bytes() == TOKENIZER


def test_make_hf_repo_and_commit_sha(tmp_path, gguf):
    folder = make_hf_repo(tmp_path, "org/name", {"a/b.txt": "text", "c.bin": b"\x00\x01", "m.gguf": gguf})
    assert (folder / "a" / "b.txt").read_text() == "text"
    assert os.path.samefile(folder / "m.gguf", gguf)  # linked, not copied
    with pytest.raises(ValueError):
        make_hf_repo(tmp_path, "no-slash", {})
    with pytest.raises(ValueError):
        make_hf_repo(tmp_path, "org/name", {"../escape": b""})
    hub = HFEndpoint(tmp_path)
    sha = hub.commit_sha("org/name")
    assert len(sha) == 40 and sha == hub.commit_sha("org/name")
    make_hf_repo(tmp_path, "org/name", {"c.bin": b"\x00\x01\x02"})
    assert hub.commit_sha("org/name") != sha  # a changed file is a new commit


def test_first_use_in_a_process_stays_on_the_loopback(hub, tmp_path):
    # huggingface_hub fetches {constants.ENDPOINT}/api/agent-harnesses (huggingface.co, whatever endpoint=
    # says) the first time a process builds a user agent, unless telemetry is off. A fresh process, with
    # a proxy that records every connection for anything but the loopback, shows whether one is tried.
    import socket
    import subprocess
    import sys
    import threading

    attempts = []
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        proxy.settimeout(0.2)
        stop = threading.Event()

        def record():
            while not stop.is_set():
                try:
                    conn, _ = proxy.accept()
                except OSError:
                    continue
                attempts.append(conn.recv(200))
                conn.close()

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "ALL_PROXY": proxy_url,
               "NO_PROXY": "127.0.0.1,localhost"}
        script = ("import sys; from huggingface_hub import hf_hub_download; "
                  "print(open(hf_hub_download(sys.argv[1], 'README.md', cache_dir=sys.argv[2], endpoint=sys.argv[3]), 'rb').read())")
        done = subprocess.run([sys.executable, "-c", script, REPO, str(tmp_path), hub.url], env=env,
                              capture_output=True, timeout=60)
        stop.set()
        recorder.join(timeout=2)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert repr(README).encode() in done.stdout
    assert attempts == [], f"requests that left the loopback: {attempts}"
