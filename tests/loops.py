"""Run a test coroutine on plain asyncio or uvloop: the relay must work on both."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]], loop_kind: str = "asyncio") -> None:
    if loop_kind == "uvloop":
        uvloop.run(coro_fn())  # type: ignore[union-attr]
    else:
        asyncio.run(coro_fn())


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition",
                   interval: float = 0.005) -> None:
    """Poll ``cond`` on the running loop until it holds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout} s")
        await asyncio.sleep(interval)
