"""The warming websocket: a snapshot of one model's load on connect, then every change, throttled."""
from __future__ import annotations

import asyncio
import time

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from catalog.selectors import offered_model_aget
from fleet.live import warming_group
from fleet.selectors import model_warming_state

CLOSE_UNAUTHENTICATED = 4401
CLOSE_UNKNOWN_MODEL = 4404

# The node publishes about four states a second; a browser needs no more than five.
MIN_INTERVAL_S = 0.2

class WarmingConsumer(AsyncJsonWebsocketConsumer):
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
        if self.model is None:
            await self.close(code=CLOSE_UNKNOWN_MODEL)
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

    @classmethod
    async def decode_json(cls, text_data):
        # A page may send only {"type": "refresh"}; anything unreadable is ignored, not fatal.
        try:
            return await super().decode_json(text_data)
        except ValueError:
            return None

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
