"""Engine subprocesses on this node: start, wait for health, find after a restart, stop."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from fleet.agent.engines.base import Engine, EngineLaunch

logger = logging.getLogger(__name__)

# Stamped into every engine's environment so a restarted worker can find what its node runs.
ENGINE_ENV_NODE = "PORTEN_ENGINE_NODE"
ENGINE_ENV_INSTANCE = "PORTEN_ENGINE_INSTANCE"

_KILL_WAIT_S = 5.0
_STOP_POLL_S = 0.05

# Popen objects of engines this process started. Holding them lets poll() reap exited children
# and keeps Popen.__del__ from warning about (or reaping behind our back) an engine that runs on.
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


@dataclass(frozen=True)
class EngineProcess:
    pid: int
    port: int
    log_path: Path


class EngineStartError(Exception):
    """An engine did not become healthy; `reason` says why, the message adds the log tail."""

    def __init__(self, reason: str, *, log_tail: str = "", exit_code: int | None = None) -> None:
        self.reason = reason
        self.log_tail = log_tail
        self.exit_code = exit_code
        message = reason
        if log_tail:
            message = f"{reason}\n--- engine log (last lines) ---\n{log_tail}"
        super().__init__(message)


def free_port(host: str = "127.0.0.1", port: int = 0) -> int:
    """A TCP port nobody listens on right now (the engine binds it a moment later): `port` if it is
    free, any free one for 0. Raises OSError when the port is taken or `host` is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
        return sock.getsockname()[1]


def start_engine(engine: Engine, launch: EngineLaunch, *, log_path: Path) -> EngineProcess:
    """Start the engine detached in its own session, output appended to `log_path`."""
    argv = engine.command(launch)
    env = {
        **os.environ,
        **engine.environment(launch),
        ENGINE_ENV_NODE: launch.node_name,
        ENGINE_ENV_INSTANCE: str(launch.instance_id),
    }
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # One header line per start, so a log appended to across restarts stays readable.
    command_line = shlex.join(argv).replace("\n", "\\n")
    with log_path.open("ab") as log:
        header = (
            f"--- porten: {time.strftime('%Y-%m-%d %H:%M:%S')} starting {engine.name} "
            f"instance {launch.instance_id} on {launch.node_name}: {command_line}\n"
        )
        log.write(header.encode())
        log.flush()
        try:
            # Own session: the engine outlives the task or worker that started it, and stopping it
            # can signal its whole process group (vLLM runs worker processes).
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            log.write(f"--- porten: could not start: {exc}\n".encode())
            raise EngineStartError(f"could not start {engine.name}: {exc}") from exc
    with _children_lock:
        _children[popen.pid] = popen
    logger.info("started %s instance %s as pid %s", engine.name, launch.instance_id, popen.pid)
    return EngineProcess(pid=popen.pid, port=launch.port, log_path=log_path)


def wait_until_healthy(
    engine: Engine,
    launch: EngineLaunch,
    proc: EngineProcess,
    *,
    timeout_s: float,
    poll_s: float = 0.02,
    should_abort: Callable[[], bool] | None = None,
    abort_check_s: float = 0.5,
) -> float:
    """Block until the engine answers its health check (asked every `poll_s`); returns the seconds
    waited. Raises EngineStartError (with the log tail) if the process exits, if `should_abort`
    (asked every `abort_check_s`) says so, or if `timeout_s` passes; in the last two cases the
    engine is stopped first.
    """
    url = engine.health_url(launch)
    started = time.monotonic()
    deadline = started + timeout_s
    abort_checked_at = started
    timeout = httpx.Timeout(2.0, connect=min(1.0, max(poll_s, 0.1)))
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        while True:
            exit_code = _exit_code(proc.pid)
            if exit_code is not None or not is_alive(proc.pid):
                raise EngineStartError(
                    f"{engine.name} exited before becoming healthy"
                    + (f" (exit code {exit_code})" if exit_code is not None else ""),
                    log_tail=log_tail(proc.log_path),
                    exit_code=exit_code,
                )
            if _answers(client, url):
                return time.monotonic() - started
            now = time.monotonic()
            if should_abort is not None and now - abort_checked_at >= abort_check_s:
                abort_checked_at = now
                if should_abort():
                    stop_engine(proc.pid, grace_s=engine.stop_grace_s)
                    raise EngineStartError(f"{engine.name} start aborted", log_tail=log_tail(proc.log_path))
            if now >= deadline:
                stop_engine(proc.pid, grace_s=engine.stop_grace_s)
                raise EngineStartError(
                    f"{engine.name} not healthy at {url} within {timeout_s:g} s; stopped it",
                    log_tail=log_tail(proc.log_path),
                )
            time.sleep(min(poll_s, max(deadline - now, 0.0)))


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True when `url` answers 200 within `timeout_s`."""
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        return _answers(client, url)


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def is_alive(pid: int) -> bool:
    """False for a missing or zombie process; reaps it if it is our own child."""
    if pid <= 0:
        return False
    if _exit_code(pid) is not None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _exit_code(pid: int) -> int | None:
    """The exit code if `pid` is our child and has exited (reaping it), else None."""
    with _children_lock:
        popen = _children.get(pid)
    if popen is not None:
        code = popen.poll()
        if code is not None:
            with _children_lock:
                _children.pop(pid, None)
        return code
    # A child started by other code in this process, or before a Popen was forgotten.
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if waited != pid:
        return None
    return os.waitstatus_to_exitcode(status)


def stop_engine(pid: int, *, grace_s: float = 10.0) -> None:
    """SIGTERM the engine's process group, SIGKILL it after `grace_s`; a no-op if it is gone."""
    _stop_many([pid], grace_s=grace_s)


def _stop_many(pids: Iterable[int], *, grace_s: float) -> None:
    # Signal everything first, then wait once: stopping N engines takes one grace period, not N.
    targets = {pid: _group_of(pid) for pid in pids if is_alive(pid)}
    for pid, pgid in targets.items():
        _signal(pid, pgid, signal.SIGTERM)
    remaining = _wait_gone(targets, grace_s)
    for pid in remaining:
        logger.warning("engine pid %s ignored SIGTERM for %.1f s; killing it", pid, grace_s)
        _signal(pid, targets[pid], signal.SIGKILL)
    still = _wait_gone({pid: targets[pid] for pid in remaining}, _KILL_WAIT_S)
    for pid in still:
        logger.error("engine pid %s survived SIGKILL for %.1f s", pid, _KILL_WAIT_S)
    # Sweep what the leader left behind in its group (e.g. worker processes).
    for pid, pgid in targets.items():
        if pgid is not None and pid not in still:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def _group_of(pid: int) -> int | None:
    """The process group to signal: the engine's own, never ours."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    if pgid != pid or pgid == os.getpgrp():
        return None
    return pgid


def _signal(pid: int, pgid: int | None, sig: signal.Signals) -> None:
    try:
        if pgid is not None:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        # Gone already, or the group emptied between our check and the signal.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(targets: dict[int, int | None], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    remaining = [pid for pid in targets if is_alive(pid)]
    while remaining and time.monotonic() < deadline:
        time.sleep(_STOP_POLL_S)
        remaining = [pid for pid in remaining if is_alive(pid)]
    return remaining


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ("" if it does not exist)."""
    try:
        with Path(path).open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            # Enough bytes for `lines` long lines without reading a multi-GB log.
            log.seek(max(0, size - max(lines, 1) * 1024))
            data = log.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def find_engine_processes(node_name: str) -> dict[int, int]:
    """instance_id -> pid of the live engines this node started (found through their environment)."""
    found: dict[int, list[int]] = {}
    for pid, instance_id in _scan_engines(node_name):
        found.setdefault(instance_id, []).append(pid)
    # Children of an engine inherit its environment; the engine is the one leading its session.
    return {instance_id: _leader(pids) for instance_id, pids in found.items()}


def stop_all_engines(node_name: str, *, grace_s: float = 10.0) -> list[int]:
    """Stop every engine of `node_name`; returns the instance ids that were stopped."""
    engines = list(_scan_engines(node_name))
    _stop_many([pid for pid, _ in engines], grace_s=grace_s)
    return sorted({instance_id for _, instance_id in engines})


def _scan_engines(node_name: str) -> Iterable[tuple[int, int]]:
    me = os.getpid()
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            env = process.environ()
            if env.get(ENGINE_ENV_NODE) != node_name:
                continue
            instance_id = int(env.get(ENGINE_ENV_INSTANCE, ""))
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
            continue
        yield process.pid, instance_id


def _leader(pids: list[int]) -> int:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if os.getsid(pid) == pid:
                return pid
    return min(pids)
