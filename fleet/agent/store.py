"""The node's model store: fetches a catalog model's weights once, with byte-level progress."""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

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


class ModelStore:
    def __init__(self, root: Path, *, endpoint: str | None = None, token: str | None = None) -> None:
        self.root = Path(root)
        self.hub_cache = self.root / "hub"
        self.local_dir = self.root / "local"
        self.markers = self.root / "complete"
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.token = token or os.environ.get("HF_TOKEN") or None

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
        return shutil.disk_usage(self.root).free // (1024 * 1024)

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
        self.markers.mkdir(parents=True, exist_ok=True)
        tmp = self._marker(source.model_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(stored)))
        tmp.replace(self._marker(source.model_id))
        return stored

    def _fetch_hub(self, source: WeightsSource, on_progress: ProgressCallback) -> StoredWeights:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
            RepositoryNotFoundError, RevisionNotFoundError,
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
        siblings = [(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
        files = [(name, size) for name, size in siblings if _wanted(name, source.hf_files)]
        if not files:
            raise StoreError(f"no file in {source.hf_repo}@{revision} matches {list(source.hf_files)}")
        bytes_total = sum(size for _, size in files)
        tracker = _ByteTracker(bytes_total, on_progress)

        # Files go one at a time so a file completed before a crash is never fetched again:
        # huggingface_hub reuses finished blobs in its cache.
        paths: list[Path] = []
        for name, size in sorted(files):
            tracker.begin_file(size)
            try:
                path = hf_hub_download(
                    source.hf_repo, name, revision=commit, cache_dir=self.hub_cache, endpoint=self.endpoint,
                    token=self.token, tqdm_class=tracker.tqdm_class(),
                )
            except EntryNotFoundError as exc:
                raise StoreError(f"{name} vanished from {source.hf_repo}@{commit}") from exc
            except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
                raise StoreError(f"download of {name} from {source.hf_repo} failed: {exc}") from exc
            tracker.end_file()
            paths.append(Path(path))
        snapshot = _common_snapshot_dir(paths, names=[n for n, _ in sorted(files)])
        return StoredWeights(
            model_id=source.model_id, path=str(_engine_path(source.weight_format, snapshot, paths)),
            bytes_total=bytes_total, source=source.fingerprint,
        )

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
                _link_or_copy(f, target, tracker)
            tracker.end_file()
            copied.append(target)
        return StoredWeights(
            model_id=source.model_id, path=str(_engine_path(source.weight_format, target_root, copied)),
            bytes_total=bytes_total, source=source.fingerprint,
        )


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
        with open(origin, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(8 * 1024 * 1024):
                dst.write(chunk)
                tracker.advance(len(chunk))
    tmp.replace(target)


class _ByteTracker:
    """Sums bytes across all files of a model, so progress is model-wide and never goes back."""

    def __init__(self, bytes_total: int, on_progress: ProgressCallback) -> None:
        self.bytes_total = bytes_total
        self.on_progress = on_progress
        self.files_done = 0
        self.file_size = 0
        self.file_bytes = 0
        self.reported = 0  # the claim already announced 0 bytes
        self.lock = threading.Lock()

    def begin_file(self, size: int) -> None:
        self.file_size, self.file_bytes = size, 0
        self._report()

    def advance(self, n: int) -> None:
        with self.lock:
            self.file_bytes = min(self.file_size, self.file_bytes + n)
        self._report()

    def end_file(self) -> None:
        self.files_done += self.file_size
        self.file_size = self.file_bytes = 0
        self._report()

    def _report(self) -> None:
        done = min(self.bytes_total, self.files_done + self.file_bytes)
        if done > self.reported:
            self.reported = done
            self.on_progress(done, self.bytes_total)

    def tqdm_class(self):
        from huggingface_hub.utils import tqdm as hf_tqdm

        tracker = self

        class ProgressBar(hf_tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = False
                kwargs.setdefault("file", _DEVNULL)
                super().__init__(*args, **kwargs)
                if self.n:
                    tracker.advance(int(self.n))

            def update(self, n=1):
                result = super().update(n)
                if n:
                    tracker.advance(int(n))
                return result

        return ProgressBar

