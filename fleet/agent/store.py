"""The node's model store: fetches a catalog model's weights once, with byte-level progress."""
from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from porten.units import MB, mb_from_bytes

logger = logging.getLogger(__name__)

_DEVNULL = open(os.devnull, "w")  # where the hidden progress bars draw
ProgressCallback = Callable[[int, int], None]  # (bytes_done, bytes_total); may raise to abort


@dataclass(frozen=True)
class WeightsSource:
    model_id: str
    weight_format: str                    # "gguf" | "safetensors"
    hf_repo: str = ""
    hf_revision: str = "main"
    hf_files: tuple[str, ...] = ()        # names or glob patterns; empty = whole repo
    local_path: str = ""

    @property
    def fingerprint(self) -> dict:
        return {"hf_repo": self.hf_repo, "hf_revision": self.hf_revision or "main",
                "hf_files": list(self.hf_files), "local_path": self.local_path}


@dataclass
class StoredWeights:
    model_id: str
    path: str                             # what the engine loads: a .gguf file or a folder
    bytes_total: int
    source: dict = field(default_factory=dict)


class StoreError(Exception):
    """Weights could not be fetched; the message says why in words an operator can act on."""


# A full disk or quota: no retry helps, the operator must make room.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Statuses worth asking again: the Hub (or a proxy in front) is overloaded or restarting.
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# huggingface_hub's size check of a body that came short (no errno), and the network's own errors.
_TRANSIENT_ERRNOS = (None, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE)
# huggingface_hub raises its HTTP client's own exceptions for a connection that broke in a way it
# does not retry itself (a reset, a refused connection once its own retries ran out). Which client
# that is changes between its releases (httpx, httpx2), so they are recognised by their package.
_TRANSPORT_PACKAGES = ("httpx", "httpx2", "httpcore", "h11", "requests", "urllib3")


class ModelStore:
    """Downloads retry transient failures (a 5xx or 429, a reset or refused connection, a size
    mismatch) `download_attempts` times in a row without progress, waiting `backoff_s` doubling up
    to `backoff_max_s` in between; huggingface_hub itself resumes a stalled or cut-short body with
    a Range request inside one call."""

    def __init__(self, root: Path, *, endpoint: str | None = None, token: str | None = None, node: str = "",
                 download_attempts: int = 6, backoff_s: float = 0.5, backoff_max_s: float = 8.0) -> None:
        self.root = Path(root)
        self.hub_cache = self.root / "hub"
        self.local_dir = self.root / "local"
        self.markers = self.root / "complete"
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.token = token or os.environ.get("HF_TOKEN") or None
        self.node = node or "this node"
        self.download_attempts, self.backoff_s, self.backoff_max_s = download_attempts, backoff_s, backoff_max_s

    # --- what is on disk -----------------------------------------------------------------
    def _marker(self, model_id: str) -> Path:
        return self.markers / f"{model_id}.json"

    def complete(self, source: WeightsSource) -> StoredWeights | None:
        """The weights, if an earlier fetch of this same source completed and they are still there."""
        marker = self._marker(source.model_id)
        try:
            stored = StoredWeights(**json.loads(marker.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if stored.source != source.fingerprint or not Path(stored.path).exists():
            return None
        return stored

    def models_on_disk(self) -> list[str]:
        if not self.markers.is_dir():
            return []
        return sorted(p.stem for p in self.markers.glob("*.json"))

    def disk_free_mb(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return mb_from_bytes(shutil.disk_usage(self.root).free)

    def _disk_full(self, what: str) -> StoreError:
        free_mb = self.disk_free_mb()
        return StoreError(f"not enough disk space on node {self.node}: the model store {self.root} filled up "
                          f"{what} ({free_mb} MB free); the partial file was removed")

    def forget(self, model_id: str) -> None:
        self._marker(model_id).unlink(missing_ok=True)

    # --- fetching ------------------------------------------------------------------------
    def fetch(self, source: WeightsSource, *, on_progress: ProgressCallback) -> StoredWeights:
        """Bring the weights onto this node (no-op when already complete) and say where they are."""
        stored = self.complete(source)
        if stored is not None:
            on_progress(stored.bytes_total, stored.bytes_total)
            return stored
        if source.local_path:
            stored = self._fetch_local(source, on_progress)
        elif source.hf_repo:
            stored = self._fetch_hub(source, on_progress)
        else:
            raise StoreError(f"{source.model_id} has no source (neither a Hugging Face repo nor a local path)")
        tmp = self._marker(source.model_id).with_suffix(".tmp")
        try:
            self.markers.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(stored)))
            tmp.replace(self._marker(source.model_id))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _DISK_FULL:
                raise self._disk_full(f"writing the completion marker of {source.model_id}") from exc
            raise
        return stored

    def _fetch_hub(self, source: WeightsSource, on_progress: ProgressCallback) -> StoredWeights:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )

        api = HfApi(endpoint=self.endpoint, token=self.token)
        revision = source.hf_revision or "main"
        try:
            info = api.model_info(source.hf_repo, revision=revision, files_metadata=True)
        except GatedRepoError as exc:
            raise StoreError(f"{source.hf_repo} is gated: set HF_TOKEN for an account that accepted its license") from exc
        except RepositoryNotFoundError as exc:
            raise StoreError(f"Hugging Face repo {source.hf_repo} not found (or private without HF_TOKEN)") from exc
        except RevisionNotFoundError as exc:
            raise StoreError(f"revision {revision!r} not found in {source.hf_repo}") from exc
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise StoreError(f"could not reach the Hugging Face Hub for {source.hf_repo}: {exc}") from exc

        commit = info.sha or revision
        # A mirror may list files without sizes (None): such a file's size is learned when its
        # download starts, and the model's total grows then.
        siblings = [(s.rfilename, int(s.size) if s.size else None) for s in (info.siblings or [])]
        files = sorted((name, size) for name, size in siblings if _wanted(name, source.hf_files))
        if not files:
            raise StoreError(f"no file in {source.hf_repo}@{revision} matches {list(source.hf_files)}")
        self._check_room(source, commit, files)
        tracker = _ByteTracker(sum(size or 0 for _, size in files), on_progress,
                               unknown_sizes=sum(1 for _, size in files if size is None))

        # Files go one at a time so a file completed before a crash is never fetched again:
        # huggingface_hub reuses finished blobs in its cache.
        paths: list[Path] = []
        for name, size in files:
            paths.append(self._download_file(source, commit, name, size, tracker))
        snapshot = _common_snapshot_dir(paths, names=[n for n, _ in files])
        return StoredWeights(
            model_id=source.model_id, path=str(_engine_path(source.weight_format, snapshot, paths)),
            bytes_total=tracker.bytes_total, source=source.fingerprint,
        )

    def _check_room(self, source: WeightsSource, commit: str, files: list[tuple[str, int | None]]) -> None:
        """Refuse before the first byte when the listed sizes of the files not yet here exceed the free disk."""
        from huggingface_hub import try_to_load_from_cache

        missing = sum(size or 0 for name, size in files if not isinstance(
            try_to_load_from_cache(source.hf_repo, name, cache_dir=self.hub_cache, revision=commit), str))
        self.hub_cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.hub_cache).free
        if missing > free:
            raise StoreError(f"not enough disk space on node {self.node}: {source.model_id} needs "
                             f"{_mb(missing)} MB more in the model store {self.root}, {_mb(free)} MB free")

    def _download_file(self, source: WeightsSource, commit: str, name: str, size: int | None,
                       tracker: "_ByteTracker") -> Path:
        """One file through huggingface_hub, asked again with backoff after a transient failure."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        failures, wait_s = 0, self.backoff_s
        while True:
            tracker.begin_file(size)
            progress_before = tracker.reported
            try:
                path = hf_hub_download(
                    source.hf_repo, name, revision=commit, cache_dir=self.hub_cache, endpoint=self.endpoint,
                    token=self.token, tqdm_class=tracker.tqdm_class(),
                )
            except Exception as exc:
                if tracker.aborted is not None:
                    raise tracker.aborted  # the caller's progress callback said stop
                if _disk_full(exc):
                    self._remove_partial_files(source.hf_repo)
                    raise self._disk_full(f"while downloading {name} of {source.hf_repo}") from exc
                if isinstance(exc, EntryNotFoundError):
                    raise StoreError(f"{name} vanished from {source.hf_repo}@{commit}") from exc
                transient = (
                    (isinstance(exc, HfHubHTTPError) and _status(exc) in _TRANSIENT_STATUS)
                    or (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS)
                    or type(exc).__module__.split(".")[0] in _TRANSPORT_PACKAGES
                )
                if not transient and not isinstance(exc, (HfHubHTTPError, OSError)):
                    raise
                # A try that moved the model's progress on starts the count afresh, as
                # huggingface_hub does for its own resumes.
                failures = 1 if tracker.reported > progress_before else failures + 1
                if not transient or failures >= self.download_attempts:
                    raise StoreError(f"download of {name} from {source.hf_repo} failed"
                                     f"{f' after {failures} tries' if transient else ''}: {_first_line(exc)}") from exc
                logger.warning("download of %s from %s failed (%s); try %d of %d in %.1f s", name, source.hf_repo,
                               _first_line(exc), failures + 1, self.download_attempts, wait_s)
                time.sleep(wait_s)
                wait_s = min(self.backoff_max_s, wait_s * 2)
                if size is None and tracker.file_size is not None:
                    size = tracker.file_size  # learned on this try: the total already counts it
                continue
            tracker.end_file()
            return Path(path)

    def _remove_partial_files(self, repo: str) -> None:
        # huggingface_hub's cache layout (documented): models--<org>--<name>/blobs/<etag>[.<id>].incomplete
        blobs = self.hub_cache / ("models--" + repo.replace("/", "--")) / "blobs"
        for partial in blobs.glob("*.incomplete"):
            partial.unlink(missing_ok=True)

    def _fetch_local(self, source: WeightsSource, on_progress: ProgressCallback) -> StoredWeights:
        origin = Path(source.local_path)
        if not origin.exists():
            raise StoreError(f"local path {origin} does not exist on this node")
        files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
        files = [f for f in files if origin.is_file() or _wanted(str(f.relative_to(origin)), source.hf_files)]
        bytes_total = sum(f.stat().st_size for f in files)
        tracker = _ByteTracker(bytes_total, on_progress)
        target_root = self.local_dir / source.model_id
        copied: list[Path] = []
        for f in files:
            relative = Path(f.name) if origin.is_file() else f.relative_to(origin)
            target = target_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            tracker.begin_file(f.stat().st_size)
            if not (target.exists() and target.stat().st_size == f.stat().st_size):
                try:
                    _link_or_copy(f, target, tracker)
                except OSError as exc:
                    if exc.errno in _DISK_FULL:
                        raise self._disk_full(f"while copying {f.name} of {source.model_id}") from exc
                    raise
            tracker.end_file()
            copied.append(target)
        return StoredWeights(
            model_id=source.model_id, path=str(_engine_path(source.weight_format, target_root, copied)),
            bytes_total=bytes_total, source=source.fingerprint,
        )


def _mb(n: int) -> int:
    return -(-n // MB)  # rounded up: "needs 1 MB" for a few bytes


def _disk_full(exc: BaseException) -> bool:
    """Whether a full disk (or quota) caused `exc`, also when a library wrapped the OSError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(name == p or fnmatch.fnmatch(name, p) for p in patterns)


def _common_snapshot_dir(paths: list[Path], *, names: list[str]) -> Path:
    first, name = paths[0], names[0]
    # hf_hub_download returns snapshots/<commit>/<name>; strip the name's own folders.
    return Path(str(first)[: -len(name)].rstrip("/")) if str(first).endswith(name) else first.parent


def _engine_path(weight_format: str, folder: Path, files: list[Path]) -> Path:
    if weight_format == "gguf":
        ggufs = sorted(f for f in files if f.name.endswith(".gguf"))
        if not ggufs:
            raise StoreError("no .gguf file among the fetched files")
        # Split GGUFs load from their first shard.
        return next((f for f in ggufs if "-00001-of-" in f.name), ggufs[0])
    return folder


def _link_or_copy(origin: Path, target: Path, tracker: "_ByteTracker") -> None:
    tmp = target.with_name(target.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(origin, tmp)
        tracker.advance(origin.stat().st_size)
    except OSError:
        try:
            with open(origin, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 * 1024 * 1024):
                    dst.write(chunk)
                    tracker.advance(len(chunk))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(target)


class _ByteTracker:
    """Sums bytes across all files of a model, so progress is model-wide and never goes back: a
    file fetched again after a failure reports nothing new until it passes what was announced.
    Files of unknown size add theirs to the total when their download starts."""

    def __init__(self, bytes_total: int, on_progress: ProgressCallback, *, unknown_sizes: int = 0) -> None:
        self.bytes_total = bytes_total
        self.on_progress = on_progress
        self.unknown_sizes = unknown_sizes  # files whose size nobody has told yet
        self.files_done = 0
        self.file_size: int | None = 0
        self.file_bytes = 0
        self.reported = 0  # the claim already announced 0 bytes
        self.reported_total = bytes_total  # announced again only when a file's size adds to it
        self.aborted: BaseException | None = None
        self.lock = threading.Lock()

    def begin_file(self, size: int | None) -> None:
        """A file starts (or starts again after a failure); None: its size comes with its download."""
        self.file_size, self.file_bytes = size, 0
        self._report()

    def learn_size(self, size: int | None) -> None:
        """The size huggingface_hub announced for the current file, used when the listing had none."""
        with self.lock:
            if self.file_size is not None or not size:
                return
            self.file_size = int(size)
            self.bytes_total += self.file_size
            self.unknown_sizes -= 1
        self._report()

    def advance(self, n: int) -> None:
        with self.lock:
            cap = self.file_size if self.file_size is not None else self.file_bytes + max(n, 0)
            self.file_bytes = max(0, min(cap, self.file_bytes + n))
        self._report()

    def end_file(self) -> None:
        with self.lock:
            if self.file_size is None:  # never announced (no body): count what came
                self.file_size = self.file_bytes
                self.bytes_total += self.file_size
                self.unknown_sizes -= 1
            self.files_done += self.file_size
            self.file_size, self.file_bytes = 0, 0
        self._report()

    def _report(self) -> None:
        with self.lock:
            total = self.bytes_total
            done = min(total, self.files_done + self.file_bytes)
            if self.unknown_sizes and done >= total:
                return  # all known bytes are in, more to come: never announce a finished download early
            if done < self.reported or (done == self.reported and total == self.reported_total):
                return
            if not total:
                return
            self.reported, self.reported_total = done, total
        try:
            self.on_progress(done, total)
        except BaseException as exc:
            self.aborted = exc
            raise

    def tqdm_class(self):
        from huggingface_hub.utils import tqdm as hf_tqdm

        tracker = self

        class ProgressBar(hf_tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = False
                kwargs.setdefault("file", _DEVNULL)
                super().__init__(*args, **kwargs)
                tracker.learn_size(self.total)
                if self.n:
                    tracker.advance(int(self.n))

            def update(self, n=1):
                result = super().update(n)
                if n:
                    tracker.advance(int(n))
                return result

        return ProgressBar

