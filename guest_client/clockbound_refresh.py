"""Keeping the ClockBound segment fresh: publish the controller's bound at every clock update
and every ``CLOCKBOUND_REFRESH_S``; readers treat it as void after ``CLOCKBOUND_VOID_AFTER``
refresh periods without one (the daemon stopped or hung)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from guest_client.clockbound_feed import guest_bound, published_bound
from guest_client.clockbound_writer import SegmentPublisher
from guest_client.controller import GuestController
from timesyncd.clockbound import CLOCK_MONOTONIC_COARSE

log = logging.getLogger("guest_client.daemon")  # the daemon's log

_NS = 1_000_000_000
#: The segment is rewritten this often and at every clock update; it is void (readers see
#: UNKNOWN) after CLOCKBOUND_VOID_AFTER refresh periods without one.
CLOCKBOUND_REFRESH_S = 1.0
CLOCKBOUND_VOID_AFTER = 3


def publish(publisher: SegmentPublisher, controller: GuestController,
            now_ns: Callable[[], int], disruption_marker: int | None = None) -> None:
    """Submit the bound now; its as-of is read before the clock, so it never looks fresher.
    With VMClock, its ``disruption_marker`` is copied into the segment."""
    as_of = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)  # before the clock reading
    gb = guest_bound(controller, now_ns())
    res = time.clock_getres(CLOCK_MONOTONIC_COARSE)
    publisher.submit(published_bound(gb, as_of, round(res * _NS), disruption_marker))


async def refresh(publish_now: Callable[[], None], counters: Counter[str]) -> None:
    """Publish every ``CLOCKBOUND_REFRESH_S`` until cancelled; a failure is counted, logged
    and retried at the next period (the segment voids itself meanwhile)."""
    while True:
        try:
            publish_now()
        except Exception:
            counters["clockbound_error"] += 1
            log.exception("clockbound_shm: could not compute the bound")
        await asyncio.sleep(CLOCKBOUND_REFRESH_S)
