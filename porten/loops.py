"""One object per event loop, for what is bound to the loop that made it (asyncio clients, tasks,
futures): the registry every per-loop helper uses."""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_objects: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Callable, object]]" = weakref.WeakKeyDictionary()


def per_loop(factory: Callable[[], T]) -> T:
    """The running loop's `factory()`, made on first use and forgotten with the loop."""
    loop = asyncio.get_running_loop()
    objects = _objects.get(loop)
    if objects is None:
        objects = _objects[loop] = {}
    found = objects.get(factory)
    if found is None:
        found = objects[factory] = factory()
    return found  # type: ignore[return-value]


def made_for_this_loop(factory: Callable[[], T]) -> T | None:
    """The running loop's `factory()` if one was made, else None (nothing is made)."""
    return _objects.get(asyncio.get_running_loop(), {}).get(factory)  # type: ignore[return-value]


def forget_loop_objects() -> None:
    """Drop every loop's objects (tests point Redis elsewhere between sessions)."""
    _objects.clear()
