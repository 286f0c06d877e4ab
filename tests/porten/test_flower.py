"""Flower as `make run` starts it (scripts/flower.sh) against the test Redis: behind basic auth, on the
port and address it is given, with a password generated once when none is set, and a taken port said."""
from __future__ import annotations

import base64
import os
import socket
import stat
import subprocess

import httpx
import psutil
import pytest

from tests.conftest import REPO_ROOT, service_env, wait_for_http
from tests.services_plugin import free_port

pytestmark = pytest.mark.timeout(90)

SCRIPT = REPO_ROOT / "scripts" / "flower.sh"


def flower_env(tmp_path, port: int, **extra: str) -> dict[str, str]:
    env = service_env(PORTEN_VAR_DIR=str(tmp_path / "var"), PORTEN_FLOWER_PORT=str(port))
    for name in ("PORTEN_FLOWER_USER", "PORTEN_FLOWER_PASSWORD", "PORTEN_FLOWER_HOST", "FLOWER_BASIC_AUTH"):
        env.pop(name, None)  # this run's own settings only
    env.update(extra)
    return env


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def flower(tmp_path):
    started: list[subprocess.Popen] = []

    def start(env: dict[str, str]) -> str:
        log = tmp_path / "flower.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(SCRIPT)], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        url = f"http://127.0.0.1:{env['PORTEN_FLOWER_PORT']}/"
        wait_for_http(url, timeout_s=60, proc=proc, log=log)
        return url

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_flower_asks_for_the_login_from_the_environment(tmp_path, flower):
    port = free_port()
    url = flower(flower_env(tmp_path, port, PORTEN_FLOWER_USER="ops", PORTEN_FLOWER_PASSWORD="s3cret-pass"))
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=basic("ops", "wrong")).status_code == 401
    assert httpx.get(url + "api/workers", headers=basic("admin", "s3cret-pass")).status_code == 401
    answer = httpx.get(url, headers=basic("ops", "s3cret-pass"))
    assert answer.status_code == 200
    assert "Flower" in answer.text
    # The password is not on a command line other users of the machine can read.
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid]
    assert listening, "Flower listens on the port it was given"
    assert all("s3cret-pass" not in " ".join(psutil.Process(c.pid).cmdline()) for c in listening)


def test_without_a_password_one_is_generated_once_into_the_var_dir(tmp_path, flower):
    env = flower_env(tmp_path, free_port())
    check = subprocess.run([str(SCRIPT), "--check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=30)
    password_file = tmp_path / "var" / "flower_password"
    assert check.returncode == 0, check.stderr
    assert f"password in {password_file}" in check.stdout
    password = password_file.read_text().strip()
    assert len(password) >= 20
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600

    url = flower(env)
    assert password_file.read_text().strip() == password, "made once, then reused"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=basic("admin", password)).status_code == 200


def test_a_taken_port_is_said_and_nothing_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        check = subprocess.run([str(SCRIPT), "--check"], cwd=REPO_ROOT, env=flower_env(tmp_path, port),
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 1
        assert f"port {port} on 127.0.0.1 is taken; going on without Flower" in check.stderr
        started = subprocess.run([str(SCRIPT)], cwd=REPO_ROOT, env=flower_env(tmp_path, port),
                                 capture_output=True, text=True, timeout=30)
        assert started.returncode == 1, "it does not try to start on a taken port"


def test_a_login_flower_would_misread_is_refused(tmp_path):
    check = subprocess.run([str(SCRIPT), "--check"], cwd=REPO_ROOT,
                           env=flower_env(tmp_path, free_port(), PORTEN_FLOWER_PASSWORD="one,two"),
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 2
    assert "must not contain ','" in check.stderr


def test_run_sh_starts_flower_through_this_script_and_does_not_watch_it():
    run_sh = (REPO_ROOT / "scripts" / "run.sh").read_text()
    assert "scripts/flower.sh --check" in run_sh
    assert "celery -A porten flower" not in run_sh, "one way to start Flower: scripts/flower.sh"
    assert os.access(SCRIPT, os.X_OK)
