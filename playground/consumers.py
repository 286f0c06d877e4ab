"""The playground's websockets: one model's warming (a snapshot on connect, then every change,
throttled), and the operators' fleet page (the whole fleet on connect, then after changes and on a timer)."""
from __future__ import annotations

import asyncio
import logging
import time

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from catalog.selectors import offered_model_aget
from fleet.live import FLEET_GROUP, warming_group
from fleet.selectors import model_warming_state
from porten.auth import caller_scope

from .selectors import fleet_overview

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_STAFF = 4403
CLOSE_UNKNOWN_MODEL = 4404

# Requests in flight and demand change with every request, which pushes nothing (the /v1 path stays
# as it is): an open fleet page reads them on this timer. Pushed changes (a phase, a download's
# progress, a heartbeat) are read at most once per FLEET_MIN_INTERVAL_S.
FLEET_REFRESH_S = 2.0
FLEET_MIN_INTERVAL_S = 0.25

# The node publishes about four states a second; a browser needs no more than five.
MIN_INTERVAL_S = 0.2


class PageSocket(AsyncJsonWebsocketConsumer):
    """A socket a page opens. A page may send only {"type": "refresh"}; anything unreadable is
    ignored, not fatal."""

    @classmethod
    async def decode_json(cls, text_data):
        try:
            return await super().decode_json(text_data)
        except ValueError:
            return None


class WarmingConsumer(PageSocket):
    """`/ws/warming/<model id>/`. Pushes are best effort: the page also polls the public warming
    endpoint when the socket is quiet or gone, so nothing here needs to be reliable, only fresh."""

    group: str | None = None

    async def connect(self) -> None:
        self.last_sent_at = 0.0
        self.last_phase: str | None = None
        self.pending: dict | None = None
        self.flush_task: asyncio.Task | None = None
        # Accepting before closing lets the page read why (4401, 4404); a refused handshake only says 1006.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.model = await offered_model_aget(self.scope["url_route"]["kwargs"]["model_id"])
        if self.model is None or not (await caller_scope(user)).allows(self.model.model_id):
            await self.close(code=CLOSE_UNKNOWN_MODEL)  # outside the person's scope: as if unknown
            return
        # Join before reading the snapshot, so no change falls between the two.
        self.group = warming_group(self.model.model_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self._send_now((await model_warming_state(self.model)).as_dict())

    async def disconnect(self, code: int) -> None:
        if self.flush_task is not None:
            self.flush_task.cancel()
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        # The page asks again when it suspects it missed something (a tab woken from sleep).
        if isinstance(content, dict) and content.get("type") == "refresh" and self.group is not None:
            await self._send_now((await model_warming_state(self.model)).as_dict())

    async def warming_update(self, event: dict) -> None:
        state = event["state"]  # already under its public phase name (fleet.live.publish_state)
        if state.get("phase") != self.last_phase:
            # Phase changes always go out at once; whatever progress was waiting is older than this.
            await self._send_now(state)
            return
        if time.monotonic() - self.last_sent_at >= MIN_INTERVAL_S and self.flush_task is None:
            await self._send_now(state)
            return
        # Too soon: keep only the newest, and send it when the interval is up.
        self.pending = state
        if self.flush_task is None:
            self.flush_task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(max(0.0, self.last_sent_at + MIN_INTERVAL_S - time.monotonic()))
        finally:
            self.flush_task = None
        if self.pending is not None:
            await self._send_now(self.pending)

    async def _send_now(self, state: dict) -> None:
        self.pending = None
        self.last_sent_at = time.monotonic()
        self.last_phase = state.get("phase")
        await self.send_json(state)


class FleetConsumer(PageSocket):
    """`/ws/fleet/`, for staff only. Each message is the whole fleet (`fleet_overview`, with `type`
    "fleet"): on connect, soon after a change pushed to the fleet group, and every FLEET_REFRESH_S.
    A push carries nothing but "something changed", so a lost one costs at most one timer period."""

    joined = False
    refresher: asyncio.Task | None = None

    async def connect(self) -> None:
        self.changed = asyncio.Event()
        await self.accept()  # then close with a code the page can read (see WarmingConsumer)
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not (user.is_active and user.is_staff):
            await self.close(code=CLOSE_NOT_STAFF)
            return
        # Join before reading, so no change falls between the snapshot and the first push.
        await self.channel_layer.group_add(FLEET_GROUP, self.channel_name)
        self.joined = True
        await self._send_overview()
        self.refresher = asyncio.create_task(self._refresh())

    async def disconnect(self, code: int) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
        if self.joined:
            await self.channel_layer.group_discard(FLEET_GROUP, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        # The page asks again when it suspects it missed something (a tab woken from sleep).
        if isinstance(content, dict) and content.get("type") == "refresh" and self.joined:
            self.changed.set()

    async def fleet_changed(self, event: dict) -> None:
        self.changed.set()

    async def _refresh(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=FLEET_REFRESH_S)
            except asyncio.TimeoutError:
                pass
            self.changed.clear()
            await self._send_overview()
            # A download pushes about four changes a second: those that come meanwhile share the next read.
            await asyncio.sleep(FLEET_MIN_INTERVAL_S)

    async def _send_overview(self) -> None:
        try:
            overview = await sync_to_async(fleet_overview, thread_sensitive=False)()
        except Exception:
            # Redis or the database away for a moment: the page keeps what it has, the timer tries again.
            logger.warning("could not read the fleet for a fleet page", exc_info=True)
            return
        await self.send_json({"type": "fleet", **overview})
