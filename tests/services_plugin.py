"""Loaded with `-p tests.services_plugin` before Django reads its settings: starts the test Redis
on a free port and points every setting that reads the environment at test-only places."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_state: dict = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise pytest.UsageError("redis-server is not installed: run `make test`, which installs it")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("test Redis did not start")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    workdir = Path(tempfile.mkdtemp(prefix="porten-test-"))
    _state["workdir"] = workdir
    os.environ["PORTEN_TEST_WORKDIR"] = str(workdir)
    os.environ["PORTEN_VAR_DIR"] = str(workdir / "var")
    os.environ["PORTEN_TEST_SQLITE_PATH"] = str(workdir / "test.sqlite3")
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("PORTEN_ENV", None)
    if os.environ.get("PORTEN_TEST_REDIS_URL"):
        os.environ["REDIS_URL"] = os.environ["PORTEN_TEST_REDIS_URL"]
        return
    port = free_port()
    _state["redis"] = start_redis(port, workdir)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    # pytest calls pytest_unconfigure only once configured: a run that stops before (a usage error,
    # an unknown option) would leave its Redis running.
    atexit.register(stop_services)


def pytest_unconfigure(config):
    stop_services()


def stop_services() -> None:
    proc = _state.pop("redis", None)
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    workdir = _state.pop("workdir", None)
    if workdir is not None and not os.environ.get("PORTEN_KEEP_TEST_DIR"):
        shutil.rmtree(workdir, ignore_errors=True)
