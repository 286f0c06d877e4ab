"""The operators' fleet page (/fleet/, staff only) and its websocket (/ws/fleet/) through the real ASGI
stack and the real Redis channel layer: refusals, the snapshot on connect, pushed changes, the timer."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from fleet.demand import demand_commands
from fleet.live import WarmingState, fleet_changed, inflight_key, publish_state
from fleet.models import Instance, Node, Phase
from playground.consumers import CLOSE_NOT_STAFF, CLOSE_UNAUTHENTICATED, FLEET_REFRESH_S
from porten.asgi import application
from porten.redis import redis_client
from tests.factories import CatalogModelFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

ORIGIN = (b"origin", b"http://127.0.0.1")


def make_user(username: str, *, staff: bool):
    return get_user_model().objects.create_user(username=username, password="pw", is_staff=staff)


def fleet_node(name: str = "fleet-node", **fields) -> Node:
    fields.setdefault("gpus", [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_mb": 81559, "free_mb": 40000}])
    fields.setdefault("last_heartbeat_at", timezone.now())
    return Node.objects.create(name=name, has_gpu=True, address="10.0.0.7", disk_free_mb=1000,
                               models_on_disk=["fleet-small"], **fields)


def page_config(response) -> dict:
    html = response.content.decode()
    return json.loads(html.split('<script id="fleet-config" type="application/json">')[1].split("</script>")[0])


@sync_to_async
def session_cookie(username: str, *, staff: bool) -> bytes:
    client = Client()
    client.force_login(make_user(username, staff=staff))
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def socket(cookie: bytes | None, origin: tuple[bytes, bytes] = ORIGIN) -> WebsocketCommunicator:
    headers = [origin] + ([(b"cookie", cookie)] if cookie else [])
    return WebsocketCommunicator(application, "/ws/fleet/", headers=headers)


async def closed_with(communicator: WebsocketCommunicator) -> int:
    connected, _ = await communicator.connect()
    assert connected, "accepted first, so the page can read why it is refused"
    output = await communicator.receive_output(timeout=2)
    assert output["type"] == "websocket.close"
    return output["code"]


async def next_fleet(communicator: WebsocketCommunicator, timeout: float) -> dict:
    message = await communicator.receive_json_from(timeout=timeout)
    assert message["type"] == "fleet"
    return message


def instance_row(overview: dict, instance_id: int) -> dict:
    [row] = [i for i in overview["instances"] if i["id"] == instance_id]
    return row


# --- the page -----------------------------------------------------------------------------------

def test_the_page_sends_anonymous_people_to_the_login_page(client):
    response = client.get("/fleet/")
    assert response.status_code == 302
    assert response["Location"] == f"{settings.LOGIN_URL}?next=/fleet/"


def test_the_page_sends_people_who_are_not_staff_to_the_login_page():
    client = Client()
    client.force_login(make_user("pat", staff=False))
    response = client.get("/fleet/")
    assert response.status_code == 302
    assert response["Location"] == f"{settings.LOGIN_URL}?next=/fleet/"


def test_the_page_shows_nodes_and_instances():
    node = fleet_node()
    model = CatalogModelFactory(model_id="fleet-small", display_name="<b>Small</b>", vram_mb=1000)
    instance = Instance.objects.create(model=model, node=node, phase=Phase.DOWNLOADING, vram_mb=1000,
                                       bytes_done=50_000_000, bytes_total=200_000_000)
    client = Client()
    client.force_login(make_user("grace", staff=True))
    response = client.get("/fleet/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "/static/playground/fleet.js" in html and "/static/playground/app.css" in html
    assert "<b>Small</b>" not in html, "catalog text is escaped"
    overview = page_config(response)["overview"]
    [row] = overview["nodes"]
    assert row["name"] == "fleet-node" and row["status"] == "online" and row["online"] is True
    assert row["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_mb": 81559, "free_mb": 40000}]
    assert (row["memory_total_mb"], row["memory_free_mb"], row["disk_free_mb"]) == (81559, 40000, 1000)
    assert row["models_on_disk"] == ["fleet-small"]
    assert 0 <= row["heartbeat_age_s"] < 5
    shown = instance_row(overview, instance.pk)
    assert shown["model"] == "fleet-small" and shown["node"] == "fleet-node"
    assert (shown["phase"], shown["done_mb"], shown["total_mb"], shown["pct"]) == ("downloading", 50.0, 200.0, 25.0)
    assert shown["inflight"] == 0 and shown["demand"] == 0


def test_a_node_past_its_heartbeat_reads_as_offline_and_a_draining_one_as_draining():
    fleet_node("gone", last_heartbeat_at=timezone.now() - timezone.timedelta(seconds=10 * settings.PORTEN_HEARTBEAT_S))
    fleet_node("leaving", draining=True)
    client = Client()
    client.force_login(make_user("grace", staff=True))
    nodes = {n["name"]: n["status"] for n in page_config(client.get("/fleet/"))["overview"]["nodes"]}
    assert nodes == {"gone": "offline", "leaving": "draining"}


# --- the websocket ------------------------------------------------------------------------------

async def test_the_socket_refuses_anonymous_people():
    assert await closed_with(socket(None)) == CLOSE_UNAUTHENTICATED


async def test_the_socket_refuses_people_who_are_not_staff():
    cookie = await session_cookie("pat", staff=False)
    assert await closed_with(socket(cookie)) == CLOSE_NOT_STAFF


async def test_the_socket_refuses_a_foreign_origin():
    cookie = await session_cookie("grace", staff=True)
    communicator = socket(cookie, origin=(b"origin", b"http://evil.example"))
    connected, _ = await communicator.connect()
    assert not connected


@sync_to_async
def busy_instance() -> Instance:
    node = fleet_node()
    model = CatalogModelFactory(model_id="fleet-busy")
    instance = Instance.objects.create(model=model, node=node, phase=Phase.READY, slots=4, load_seconds=1.5)
    pipe = redis_client().pipeline(transaction=False)
    pipe.hset(inflight_key(instance.pk), mapping={"hub-a": 2, "hub-b": 1})
    demand_commands(pipe, "fleet-busy", served=True, count=5)
    pipe.execute()
    return instance


async def test_the_socket_sends_the_whole_fleet_on_connect():
    cookie = await session_cookie("grace", staff=True)
    instance = await busy_instance()
    communicator = socket(cookie)
    assert (await communicator.connect())[0]
    overview = await next_fleet(communicator, timeout=2)
    assert [n["name"] for n in overview["nodes"]] == ["fleet-node"]
    row = instance_row(overview, instance.pk)
    assert (row["phase"], row["public_phase"], row["node"]) == ("ready", "ready", "fleet-node")
    assert row["inflight"] == 3, "summed over hub processes"
    assert row["requests"] == 5 and row["demand"] > 4, row
    await communicator.disconnect()


async def test_a_published_state_reaches_the_socket_before_the_timer():
    cookie = await session_cookie("grace", staff=True)
    instance = await busy_instance()
    communicator = socket(cookie)
    assert (await communicator.connect())[0]
    assert instance_row(await next_fleet(communicator, timeout=2), instance.pk)["phase"] == "ready"

    # What the node agent does when an unload starts: the row, then publish_state, from a worker thread.
    await Instance.objects.filter(pk=instance.pk).aupdate(phase=Phase.DRAINING)
    pushed_at = time.monotonic()
    await sync_to_async(publish_state, thread_sensitive=False)(WarmingState(
        model="fleet-busy", phase="draining", instance=instance.pk, node="fleet-node"))
    row = instance_row(await next_fleet(communicator, timeout=FLEET_REFRESH_S / 2), instance.pk)
    assert time.monotonic() - pushed_at < FLEET_REFRESH_S / 2
    assert (row["phase"], row["public_phase"]) == ("draining", "ready")
    await communicator.disconnect()


async def test_download_progress_comes_from_the_freshest_state():
    cookie = await session_cookie("grace", staff=True)
    instance = await busy_instance()
    await Instance.objects.filter(pk=instance.pk).aupdate(phase=Phase.DOWNLOADING, bytes_done=0,
                                                         bytes_total=400_000_000)
    communicator = socket(cookie)
    assert (await communicator.connect())[0]
    assert instance_row(await next_fleet(communicator, timeout=2), instance.pk)["pct"] == 0.0
    # The node writes progress to Redis several times a second and to the row about once a second.
    await sync_to_async(publish_state, thread_sensitive=False)(WarmingState(
        model="fleet-busy", phase="downloading", instance=instance.pk, node="fleet-node",
        bytes_done=100_000_000, bytes_total=400_000_000, rate_bps=50e6))
    row = instance_row(await next_fleet(communicator, timeout=FLEET_REFRESH_S / 2), instance.pk)
    assert (row["done_mb"], row["total_mb"], row["pct"], row["rate_mbps"]) == (100.0, 400.0, 25.0, 50.0)
    await communicator.disconnect()


async def test_a_heartbeat_push_and_the_timer_both_refresh_the_page():
    cookie = await session_cookie("grace", staff=True)
    instance = await busy_instance()
    communicator = socket(cookie)
    assert (await communicator.connect())[0]
    await next_fleet(communicator, timeout=2)

    # A heartbeat (fleet.agent.services.node_heartbeat) pushes "changed": the node's new state shows at once.
    await Node.objects.filter(name="fleet-node").aupdate(draining=True)
    await sync_to_async(fleet_changed, thread_sensitive=False)()
    overview = await next_fleet(communicator, timeout=FLEET_REFRESH_S / 2)
    assert overview["nodes"][0]["status"] == "draining"

    # Requests in flight push nothing (the /v1 path stays lean): the timer brings them.
    await sync_to_async(redis_client().hset)(inflight_key(instance.pk), "hub-c", 4)
    started = time.monotonic()
    overview = await next_fleet(communicator, timeout=FLEET_REFRESH_S + 1.5)
    assert instance_row(overview, instance.pk)["inflight"] == 7
    assert time.monotonic() - started >= FLEET_REFRESH_S / 2, "it came from the timer, not a push"
    await communicator.disconnect()


async def test_a_page_may_ask_for_a_fresh_snapshot():
    cookie = await session_cookie("grace", staff=True)
    await busy_instance()
    communicator = socket(cookie)
    assert (await communicator.connect())[0]
    first = await next_fleet(communicator, timeout=2)
    await asyncio.sleep(0.3)
    await communicator.send_to(text_data="not json")  # ignored, not fatal
    await communicator.send_json_to({"type": "refresh"})
    second = await next_fleet(communicator, timeout=FLEET_REFRESH_S / 2)
    assert second["at"] > first["at"]
    await communicator.disconnect()


# --- in a real browser --------------------------------------------------------------------------

def test_the_page_shows_a_cold_model_warm_up_live_in_chromium(live_hub, node_worker, hf):
    """A staff member watches /fleet/ while a script asks for a cold model: the instance appears and
    goes through downloading and loading to ready without a reload."""
    import httpx

    from porten.keys import api_key_create
    from tests.fleet.conftest import offered
    from tests.playground.test_browser import Browser, output_dir

    get_user_model().objects.create_user("ops", password="a long test password", is_staff=True)
    offered("gemma-fleet", display_name="Gemma on the fleet page", context_length=512)
    _, key = api_key_create(name="fleet-page")
    hf.throttle_bytes_per_s = 30_000_000  # ~8 s for the 253 MB file: long enough to watch
    browser = Browser(live_hub.url, output_dir("fleet-page"))
    try:
        page = browser.page
        page.goto(live_hub.url + "/fleet/")
        assert "/accounts/login/" in page.url, "the fleet page is for signed-in staff"
        page.fill("#id_username", "ops")
        page.fill("#id_password", "a long test password")
        page.click("input[type=submit]")
        page.wait_for_url(live_hub.url + "/fleet/")
        page.wait_for_selector(f'#node-rows tr[data-node="{node_worker.name}"][data-status="online"]')
        page.wait_for_function("() => document.getElementById('live').dataset.state === 'live'")
        assert page.query_selector('#instance-rows tr[data-model="gemma-fleet"]') is None
        page.evaluate("() => { window.notReloaded = true; }")
        browser.shot("1-cold")

        answers: list[httpx.Response] = []
        request = threading.Thread(target=lambda: answers.append(httpx.post(
            live_hub.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=180,
            json={"model": "gemma-fleet", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})))
        request.start()
        phases: list[str] = []
        seen_pct: list[float] = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            row = page.evaluate("""() => {
                const row = document.querySelector('#instance-rows tr[data-model="gemma-fleet"]');
                return row && {phase: row.dataset.rawPhase, pct: Number(row.dataset.pct), text: row.innerText};
            }""")
            if row:
                if not phases or phases[-1] != row["phase"]:
                    phases.append(row["phase"])
                    browser.shot(f"{len(phases) + 1}-{row['phase']}")
                if row["phase"] == "downloading" and (not seen_pct or row["pct"] != seen_pct[-1]):
                    seen_pct.append(row["pct"])
                if row["phase"] == "ready":
                    break
            time.sleep(0.1)
        request.join(timeout=120)

        assert phases and phases[-1] == "ready", phases
        assert "downloading" in phases, phases
        # Forward only: queued, downloading, loading (an engine start of about a second), ready.
        order = ["queued", "downloading", "loading", "ready"]
        assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases
        assert len(seen_pct) >= 3 and seen_pct == sorted(seen_pct), f"the download moved: {seen_pct}"
        assert answers and answers[0].status_code == 200, answers and answers[0].text
        row = page.inner_text('#instance-rows tr[data-model="gemma-fleet"]')
        assert node_worker.name in row and "loaded in" in row, row
        # The model's weights are on the node's disk now, which its next heartbeat reports.
        page.wait_for_selector(f'#node-rows tr[data-node="{node_worker.name}"] .cap:text-is("gemma-fleet")',
                               timeout=10_000)
        assert page.evaluate("() => window.notReloaded") is True
        browser.shot(f"{len(phases) + 2}-on-disk")
        assert not browser.console_errors, (browser.console_errors, browser.failed_responses)
    finally:
        browser.close()
        print(f"\nscreenshots: {browser.shots}")
