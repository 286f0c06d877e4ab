"""The fleet across hosts: placement by fit, engines on their node's address, drain, node loss and
return, replicas of a hot model, and the agent's refusals."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.multinode.conftest import HEARTBEAT_S, NODES, chat, eventually, offered

pytestmark = pytest.mark.usefixtures("db_access")


def live_on(model_id: str) -> dict[str, str]:
    """node name -> phase of each live instance of the model."""
    from fleet.models import ACTIVE_PHASES, Instance

    return dict(Instance.objects.filter(model__model_id=model_id, phase__in=ACTIVE_PHASES).values_list(
        "node__name", "phase"))


def test_models_spread_by_fit_and_the_big_one_lands_on_the_only_node_that_can_hold_it(fleet, api_key):
    from django.db import connection

    assert connection.vendor == "postgresql"
    offered("fleet-big", vram_mb=9000)
    offered("fleet-one", vram_mb=2500)
    offered("fleet-two", vram_mb=2500)
    big = chat(fleet, api_key, "fleet-big")
    assert big.status_code == 200, big.text
    assert big.headers["x-porten-node"] == "test-fleet-c"
    # Best fit: the first small model takes the room left on c (3,000 MB, the tightest fit); the
    # second no longer fits there and goes to a small node.
    one = chat(fleet, api_key, "fleet-one")
    assert one.status_code == 200 and one.headers["x-porten-node"] == "test-fleet-c", one.text
    two = chat(fleet, api_key, "fleet-two")
    assert two.status_code == 200 and two.headers["x-porten-node"] in {"test-fleet-a", "test-fleet-b"}, two.text
    assert live_on("fleet-big") == {"test-fleet-c": "ready"}


def test_each_engine_listens_on_its_node_address_only(fleet, api_key):
    from fleet.models import Instance, Phase

    ready = list(Instance.objects.filter(phase=Phase.READY).select_related("node"))
    assert {i.node.name for i in ready} >= {"test-fleet-c"}
    for instance in ready:
        address = NODES[instance.node.name][0]
        assert instance.node.address == address
        with socket.create_connection((address, instance.port), timeout=2):
            pass  # the hub's way in
        # The engine listens there and nowhere else. (Asked of the engine's process: a port free on
        # its address may be another process's on 127.0.0.1, so a connection there proves nothing.)
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(instance.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {(address, instance.port)}, listening


def test_a_second_agent_under_a_name_already_online_refuses(fleet):
    name = "test-fleet-a"
    env = fleet.node_env(name, *NODES[name])
    done = subprocess.run([sys.executable, "manage.py", "node_worker"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"node {name} is already online" in done.stderr and "PORTEN_NODE_NAME" in done.stderr


def test_a_drained_node_empties_with_no_failed_request_and_undrained_is_used_again(fleet, api_key):
    holder = next(iter(live_on("fleet-two")))
    assert holder != "test-fleet-c"
    drain = subprocess.run([sys.executable, "manage.py", "drain_node", holder], cwd=REPO_ROOT,
                           env=fleet.node_env(holder, *NODES[holder]), capture_output=True, text=True, timeout=60)
    assert drain.returncode == 0, drain.stderr
    # Requests go on being answered while the model moves; none fails.
    statuses, served_by = [], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and holder in live_on("fleet-two"):
        reply = chat(fleet, api_key, "fleet-two")
        statuses.append(reply.status_code)
        served_by.append(reply.headers.get("x-porten-node"))
    assert statuses and set(statuses) == {200}, statuses
    assert holder not in live_on("fleet-two"), "the model moved off the draining node"
    assert chat(fleet, api_key, "fleet-two").headers["x-porten-node"] != holder
    waited = subprocess.run([sys.executable, "manage.py", "drain_node", holder, "--wait", "60"], cwd=REPO_ROOT,
                            env=fleet.node_env(holder, *NODES[holder]), capture_output=True, text=True, timeout=90)
    assert waited.returncode == 0 and "can leave" in waited.stdout, waited.stderr
    # Nothing new lands there while it drains.
    offered("fleet-elsewhere", vram_mb=1000)
    elsewhere = chat(fleet, api_key, "fleet-elsewhere")
    assert elsewhere.status_code == 200 and elsewhere.headers["x-porten-node"] != holder, elsewhere.text

    def drain(name: str, *flags: str) -> None:
        done = subprocess.run([sys.executable, "manage.py", "drain_node", name, *flags], cwd=REPO_ROOT,
                              env=fleet.node_env(name, *NODES[name]), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    # Undrained, it is used again: with the other nodes drained for a moment, a new model lands there.
    drain(holder, "--undo")
    others = [name for name in NODES if name != holder]
    for name in others:
        drain(name)
    try:
        offered("fleet-three", vram_mb=1000)
        placed = chat(fleet, api_key, "fleet-three")
        assert placed.status_code == 200, placed.text
        assert placed.headers["x-porten-node"] == holder
    finally:
        for name in others:
            drain(name, "--undo")


def test_the_admin_drains_and_undrains_nodes(fleet):
    from django.contrib.auth.models import User
    from django.test import Client

    from fleet.models import Node

    User.objects.filter(username="fleet-admin").delete()
    User.objects.create_superuser("fleet-admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(User.objects.get(username="fleet-admin"))
    node = Node.objects.get(name="test-fleet-b")
    for action, draining in (("drain", True), ("undrain", False)):
        response = client.post("/admin/fleet/node/", {"action": action, "_selected_action": [node.pk]})
        assert response.status_code == 302
        node.refresh_from_db()
        assert node.draining is draining


def test_a_killed_node_loses_its_instances_within_three_heartbeats_and_its_models_answer_elsewhere(fleet, api_key):
    from fleet.models import Instance, Phase

    assert chat(fleet, api_key, "fleet-two").status_code == 200  # loaded somewhere, whatever came before
    victim = next(iter(live_on("fleet-two")))
    killed_at = time.monotonic()
    fleet.kill_node(victim)
    eventually(lambda: victim not in live_on("fleet-two"), timeout_s=3 * HEARTBEAT_S + 1,
               what="the killed node's instance marked lost")
    lost = Instance.objects.filter(model__model_id="fleet-two", node__name=victim).latest("created_at")
    assert lost.phase == Phase.FAILED and "stopped sending heartbeats" in lost.last_error
    assert time.monotonic() - killed_at <= 3 * HEARTBEAT_S + 1
    reply = chat(fleet, api_key, "fleet-two")
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-porten-node"] not in {victim}
    fleet.start_node(victim)  # back for the tests after this one


def test_a_node_back_after_a_kill_is_used_again(fleet, api_key):
    assert chat(fleet, api_key, "fleet-big").headers["x-porten-node"] == "test-fleet-c"
    fleet.kill_node("test-fleet-c")
    eventually(lambda: not live_on("fleet-big"), timeout_s=3 * HEARTBEAT_S + 1, what="the big model marked lost")
    gone = chat(fleet, api_key, "fleet-big", timeout_s=30)
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "no_capacity"
    fleet.start_node("test-fleet-c")
    back = chat(fleet, api_key, "fleet-big")
    assert back.status_code == 200, back.text
    assert back.headers["x-porten-node"] == "test-fleet-c"


def test_a_hot_model_gains_one_replica_per_step_spreads_its_requests_and_sheds_them_when_quiet(fleet, api_key):
    from fleet.models import Instance

    offered("fleet-hot", vram_mb=300, max_replicas=3, target_inflight=1)  # fits beside whatever is loaded
    assert chat(fleet, api_key, "fleet-hot").status_code == 200
    nodes_seen: set[str] = set()

    async def hammer(seconds: float) -> list[int]:
        statuses = []
        async with httpx.AsyncClient(timeout=180) as http:
            async def one_client():
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    reply = await http.post(fleet.hub_url + "/v1/chat/completions",
                                            headers={"Authorization": f"Bearer {api_key}"},
                                            json={"model": "fleet-hot", "max_tokens": 24,
                                                  "messages": [{"role": "user", "content": "Tell me a story"}]})
                    statuses.append(reply.status_code)
                    nodes_seen.add(reply.headers.get("x-porten-node"))
            await asyncio.gather(*[one_client() for _ in range(4)])
        return statuses

    statuses = asyncio.run(hammer(40))
    assert set(statuses) == {200}, statuses
    replicas = list(Instance.objects.filter(model__model_id="fleet-hot").order_by("created_at"))
    ready = [r for r in replicas if r.ready_at is not None]
    assert len(ready) == 3, [(r.node_id, r.phase, r.last_error[:80]) for r in replicas]
    assert len({r.node_id for r in ready}) == 3, "each replica on a node of its own"
    for before, after in zip(ready, ready[1:]):
        assert after.created_at >= before.ready_at, "one extra load per step: the next waited for the last"
    assert len(nodes_seen) >= 2, nodes_seen
    shown = httpx.get(fleet.hub_url + "/public/v1/models/warming", params={"model": "fleet-hot"}).json()
    assert sorted(r["node"] for r in shown["replicas"]) == sorted(live_on("fleet-hot"))
    assert {r["phase"] for r in shown["replicas"]} == {"ready"}
    # Quiet now: past a demand window at low load, a replica goes.
    eventually(lambda: len(live_on("fleet-hot")) < 3, timeout_s=20 + 15, every_s=1, what="a replica unloaded")


def test_a_model_with_min_replicas_is_loaded_without_a_request(fleet):
    offered("fleet-kept", vram_mb=800, min_replicas=1)
    eventually(lambda: "ready" in live_on("fleet-kept").values(), timeout_s=60, every_s=0.5,
               what="min_replicas preloaded")


def test_a_node_whose_address_is_not_this_machines_fails_its_loads_naming_it(fleet, api_key):
    from fleet.models import Instance, Node, Phase
    from fleet.services import instance_create

    name = "test-fleet-wrong"
    env = fleet.node_env(name, "192.0.2.10", 4000)  # TEST-NET-1: never this machine's
    from tests.fleet.conftest import NodeWorker

    worker = NodeWorker(name, env, fleet.workdir / f"worker-{name}.log")
    fleet.nodes[name] = worker.start()
    model = offered("fleet-misaddressed", vram_mb=500)
    instance = instance_create(model=model, node=Node.objects.get(name=name))
    failed = eventually(lambda: (i := Instance.objects.get(pk=instance.pk)).phase == Phase.FAILED and i,
                        timeout_s=60, what="the load failed")
    assert "192.0.2.10" in failed.last_error and "PORTEN_ENGINE_BIND" in failed.last_error
