"""The warming websocket through the real ASGI stack (origin check, session auth) and the real
Redis channel layer: snapshot on connect, ordered and throttled updates, refusals."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from fleet.live import WarmingState, publish_state, warming_group
from fleet.models import Instance, Node, Phase
from playground.consumers import CLOSE_UNAUTHENTICATED, CLOSE_UNKNOWN_MODEL, MIN_INTERVAL_S
from porten.asgi import application
from tests.factories import CatalogModelFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

ORIGIN = (b"origin", b"http://127.0.0.1")


@sync_to_async
def session_cookie(username: str = "ada") -> bytes:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(username=username, password="pw")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


@sync_to_async
def offered(model_id: str, **fields):
    return CatalogModelFactory(model_id=model_id, **fields)


@sync_to_async
def instance_in(model, phase: str, **fields) -> Instance:
    node, _ = Node.objects.get_or_create(name="ws-node", defaults={
        "gpus": [{"index": 0, "total_mb": 4096, "free_mb": 4096}], "last_heartbeat_at": timezone.now()})
    return Instance.objects.create(model=model, node=node, phase=phase, **fields)


def socket(model_id: str, cookie: bytes | None) -> WebsocketCommunicator:
    headers = [ORIGIN] + ([(b"cookie", cookie)] if cookie else [])
    return WebsocketCommunicator(application, f"/ws/warming/{model_id}/", headers=headers)


async def closed_with(communicator: WebsocketCommunicator) -> int:
    connected, _ = await communicator.connect()
    assert connected, "accepted first, so the page can read why it is refused"
    output = await communicator.receive_output(timeout=2)
    assert output["type"] == "websocket.close"
    return output["code"]


async def drain(communicator: WebsocketCommunicator, *, quiet_s: float = 1.0) -> list[tuple[float, dict]]:
    """Every message until the socket stays quiet, with its arrival time."""
    received = []
    # receive_nothing, unlike a receive that times out, leaves the application running.
    while not await communicator.receive_nothing(timeout=quiet_s, interval=0.01):
        message = await communicator.receive_json_from(timeout=1)
        received.append((time.monotonic(), message))
    return received


async def collect(communicator: WebsocketCommunicator, into: list[tuple[float, dict]]) -> None:
    """Record each message as the application sends it (arrival times for the throttle)."""
    while True:
        message = await communicator.output_queue.get()
        into.append((time.monotonic(), json.loads(message["text"])))


def progress(model_id: str, instance_id: int, done: int, total: int = 1000, phase: str = "downloading") -> dict:
    """A state as it reaches the channel-layer group."""
    return WarmingState(model=model_id, phase=phase, instance=instance_id, bytes_done=done, bytes_total=total,
                        rate_bps=5e6).as_dict()


async def test_unauthenticated_socket_is_refused():
    await offered("ws-anon")
    communicator = socket("ws-anon", cookie=None)
    assert await closed_with(communicator) == CLOSE_UNAUTHENTICATED
    await communicator.wait()


async def test_a_stale_session_is_refused():
    await offered("ws-stale")
    communicator = socket("ws-stale", cookie=b"sessionid=not-a-session")
    assert await closed_with(communicator) == CLOSE_UNAUTHENTICATED


async def test_unknown_or_disabled_model_is_refused():
    cookie = await session_cookie()
    await offered("ws-off", enabled=False)
    for model_id in ("no-such-model", "ws-off"):
        communicator = socket(model_id, cookie)
        assert await closed_with(communicator) == CLOSE_UNKNOWN_MODEL


async def test_a_model_outside_the_persons_scope_is_refused_as_if_unknown():
    cookie = await session_cookie("grace")
    await offered("ws-theirs")
    await offered("ws-other")

    @sync_to_async
    def limit_to_theirs():
        from django.contrib.auth import get_user_model

        from porten.models import AccessPolicy
        AccessPolicy.objects.create(user=get_user_model().objects.get(username="grace"), allowed_models=["ws-theirs"])

    await limit_to_theirs()
    assert await closed_with(socket("ws-other", cookie)) == CLOSE_UNKNOWN_MODEL
    allowed = socket("ws-theirs", cookie)
    assert (await allowed.connect())[0]
    assert (await allowed.receive_json_from(timeout=2))["model"] == "ws-theirs"
    await allowed.disconnect()


async def test_a_foreign_origin_is_refused():
    await offered("ws-origin")
    communicator = WebsocketCommunicator(application, "/ws/warming/ws-origin/",
                                         headers=[(b"origin", b"http://evil.example")])
    connected, _ = await communicator.connect()
    assert not connected


async def test_snapshot_on_connect_shows_an_idle_model():
    cookie = await session_cookie()
    await offered("ws-idle")
    communicator = socket("ws-idle", cookie)
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from(timeout=2)
    assert snapshot["model"] == "ws-idle"
    assert snapshot["phase"] == "idle"
    assert snapshot["ready"] is False
    await communicator.disconnect()


@pytest.mark.parametrize("phase, public_phase, pct", [
    (Phase.DOWNLOADING, "downloading", 25.0),
    (Phase.LOADING, "loading", 100.0),
    (Phase.READY, "ready", 100.0),
    (Phase.DRAINING, "ready", 100.0),
])
async def test_snapshot_on_connect_shows_the_phase(phase, public_phase, pct):
    cookie = await session_cookie()
    model = await offered(f"ws-snap-{phase}")
    await instance_in(model, phase, bytes_done=250_000_000 if phase == Phase.DOWNLOADING else 1_000_000_000,
                      bytes_total=1_000_000_000)
    communicator = socket(model.model_id, cookie)
    assert (await communicator.connect())[0]
    snapshot = await communicator.receive_json_from(timeout=2)
    assert snapshot["phase"] == public_phase
    assert snapshot["pct"] == pct
    assert snapshot["ready"] is (public_phase == "ready")
    await communicator.disconnect()


async def test_snapshot_shows_a_failed_load_with_its_reason():
    cookie = await session_cookie()
    model = await offered("ws-failed")
    await instance_in(model, Phase.FAILED, last_error="engine exited: out of memory")
    communicator = socket("ws-failed", cookie)
    assert (await communicator.connect())[0]
    snapshot = await communicator.receive_json_from(timeout=2)
    assert snapshot["phase"] == "failed"
    assert "out of memory" in snapshot["error"]
    await communicator.disconnect()


async def test_updates_arrive_in_order_from_the_channel_layer():
    cookie = await session_cookie()
    model = await offered("ws-order")
    instance = await instance_in(model, Phase.QUEUED)
    communicator = socket("ws-order", cookie)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from(timeout=2))["phase"] == "queued"
    layer = get_channel_layer()
    steps = [progress("ws-order", instance.pk, 0), progress("ws-order", instance.pk, 400),
             progress("ws-order", instance.pk, 1000, phase="loading"), progress("ws-order", instance.pk, 1000, phase="ready")]
    for state in steps:
        await layer.group_send(warming_group("ws-order"), {"type": "warming.update", "state": state})
        await asyncio.sleep(MIN_INTERVAL_S + 0.05)
    received = [message for _, message in await drain(communicator)]
    assert [(m["phase"], m["bytes_done"]) for m in received] == [
        ("downloading", 0), ("downloading", 400), ("loading", 1000), ("ready", 1000)]
    assert received[-1]["ready"] is True
    await communicator.disconnect()


async def test_publish_state_from_a_node_reaches_the_socket():
    cookie = await session_cookie()
    model = await offered("ws-publish")
    instance = await instance_in(model, Phase.DOWNLOADING, bytes_total=1000)
    communicator = socket("ws-publish", cookie)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from(timeout=2)
    # What the node agent calls, from a worker thread.
    await sync_to_async(publish_state, thread_sensitive=False)(WarmingState(
        model="ws-publish", phase="downloading", instance=instance.pk, bytes_done=640, bytes_total=1000))
    update = await communicator.receive_json_from(timeout=3)
    assert update["phase"] == "downloading"
    assert update["bytes_done"] == 640
    assert update["pct"] == 64.0
    await communicator.disconnect()


async def test_an_unloaded_instance_reads_as_cold():
    cookie = await session_cookie()
    model = await offered("ws-unload")
    instance = await instance_in(model, Phase.READY)
    communicator = socket("ws-unload", cookie)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from(timeout=2))["phase"] == "ready"
    for phase in ("draining", "stopped"):  # as the node publishes them
        await sync_to_async(publish_state, thread_sensitive=False)(
            WarmingState(model="ws-unload", phase=phase, instance=instance.pk))
    received = [message for _, message in await drain(communicator, quiet_s=0.6)]
    # Draining still answers: to a person it is ready (a repeat of "ready" may be throttled away).
    assert {m["phase"] for m in received[:-1]} <= {"ready"}
    assert received[-1]["phase"] == "idle"
    assert received[-1]["ready"] is False
    await communicator.disconnect()


async def test_fifty_quick_updates_are_throttled_but_the_last_one_arrives():
    cookie = await session_cookie()
    model = await offered("ws-throttle")
    instance = await instance_in(model, Phase.DOWNLOADING, bytes_total=1000)
    communicator = socket("ws-throttle", cookie)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from(timeout=2)
    layer = get_channel_layer()
    received: list[tuple[float, dict]] = []
    collector = asyncio.create_task(collect(communicator, received))
    started = time.monotonic()
    for done in range(1, 51):
        await layer.group_send(warming_group("ws-throttle"),
                               {"type": "warming.update", "state": progress("ws-throttle", instance.pk, done * 20)})
        await asyncio.sleep(0.01)
    sent_s = time.monotonic() - started
    await asyncio.sleep(1.0)
    collector.cancel()
    assert 1 <= len(received) <= sent_s / MIN_INTERVAL_S + 2, f"{len(received)} messages for 50 updates in {sent_s:.2f} s"
    assert len(received) < 25
    assert received[-1][1]["bytes_done"] == 1000, "the final state always arrives"
    done_values = [m["bytes_done"] for _, m in received]
    assert done_values == sorted(done_values), "never older after newer"
    gaps = [b[0] - a[0] for a, b in zip(received, received[1:])]
    # Arrival times carry the event loop's jitter, hence the margin below the interval.
    assert all(gap >= MIN_INTERVAL_S / 2 for gap in gaps), gaps
    await communicator.disconnect()


async def test_phase_changes_are_never_throttled_away():
    cookie = await session_cookie()
    model = await offered("ws-phases")
    instance = await instance_in(model, Phase.QUEUED)
    communicator = socket("ws-phases", cookie)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from(timeout=2)
    layer = get_channel_layer()
    burst = [progress("ws-phases", instance.pk, done) for done in range(0, 1000, 50)]
    burst += [progress("ws-phases", instance.pk, 1000, phase="loading"),
              progress("ws-phases", instance.pk, 1000, phase="ready")]
    for state in burst:
        await layer.group_send(warming_group("ws-phases"), {"type": "warming.update", "state": state})
    received = [message for _, message in await drain(communicator)]
    phases = []
    for message in received:
        if not phases or phases[-1] != message["phase"]:
            phases.append(message["phase"])
    assert phases == ["downloading", "loading", "ready"]
    assert len(received) < len(burst)
    await communicator.disconnect()


async def test_refresh_sends_a_fresh_snapshot():
    cookie = await session_cookie()
    model = await offered("ws-refresh")
    communicator = socket("ws-refresh", cookie)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from(timeout=2))["phase"] == "idle"
    await instance_in(model, Phase.LOADING)
    await communicator.send_to(text_data="not json")  # ignored, the socket stays up
    await communicator.send_json_to({"type": "refresh"})
    assert (await communicator.receive_json_from(timeout=2))["phase"] == "loading"
    await communicator.disconnect()
