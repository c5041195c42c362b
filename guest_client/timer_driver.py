"""Waking the sans-IO controller at the times it asks for (the daemon's timer loop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

from guest_client.actions import Action
from guest_client.controller import GuestController

_NS = 1_000_000_000
#: Re-evaluate the controller's timer at least this often (seconds), whatever it asked for.
MAX_SLEEP_S = 60.0


async def drive_timers(controller: GuestController, now_ns: Callable[[], int],
                       apply: Callable[[list[Action]], None], wake: asyncio.Event,
                       counters: Counter[str], running: Callable[[], bool]) -> None:
    """Call ``controller.on_timer`` when due and ``apply`` its actions, while ``running()``;
    ``wake`` cuts a sleep short (a new sample may have moved the next deadline)."""
    while running():  # a fatal clock error ends it: nothing may act on the clock
        due = controller.next_timer_ns()
        now = now_ns()
        if due is not None and now >= due:
            apply(controller.on_timer(now))
            after = controller.next_timer_ns()
            if after is not None and after <= now:
                counters["timer_not_advanced"] += 1
                await asyncio.sleep(0.001)  # never spin on a controller that did not move
            continue
        timeout = MAX_SLEEP_S if due is None else min(MAX_SLEEP_S, (due - now) / _NS)
        wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                await wake.wait()
