"""Loaded with `-p tests.services_plugin` before Django reads its settings: starts the test Redis
(and, with PORTEN_TEST_POSTGRES=1, a throwaway PostgreSQL cluster) on free ports and points every
setting that reads the environment at test-only places."""
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


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise pytest.UsageError("PostgreSQL is not installed: run `make test`, which installs it")
    return found[-1].parent


def start_postgres(port: int, workdir: Path) -> Path:
    """A throwaway cluster in `workdir` (trust auth, loopback only); returns its data directory.
    As root, PostgreSQL's programs run as the `postgres` user, as they refuse to run as root."""
    data, sockets = workdir / "pgdata", workdir / "pgsock"
    sockets.mkdir()
    as_user = [] if os.getuid() != 0 else ["runuser", "-u", "postgres", "--"]
    if os.getuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
    bin_dir = postgres_bin()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "postgres.log"), "-w",
                    "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                          "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
                    "start"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "porten"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return data


def stop_postgres(data: Path) -> None:
    as_user = [] if os.getuid() != 0 else ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


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
    if os.environ.get("PORTEN_TEST_POSTGRES") == "1":
        pg_dir = Path(tempfile.mkdtemp(prefix="porten-pg-"))
        port = free_port()
        _state["postgres"] = start_postgres(port, pg_dir)
        _state["postgres_dir"] = pg_dir
        os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{port}/porten"
        atexit.register(stop_services)
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
    data = _state.pop("postgres", None)
    if data is not None:
        stop_postgres(data)
        shutil.rmtree(_state.pop("postgres_dir"), ignore_errors=True)
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
