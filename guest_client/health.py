"""Send the relay periodic health reports over the guest's existing relay connection.

The enclave has no metrics endpoint of its own; the relay turns these reports into per-guest
metrics on the host. Reports are fire-and-forget (nothing answers them), paced by
:class:`timesyncd.health.HealthPacer`, and skipped while the link is down, so a slow or absent
relay costs the daemon nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from timesyncd.aio import cancel_task
from timesyncd.framing import Frame, FramingError
from timesyncd.health import HealthPacer, HealthReport
from timesyncd.status_report import StatusReport

log = logging.getLogger(__name__)


class HealthReporter:
    """``send(frame) -> bool`` writes a frame on the relay link (False when it is down);
    ``status()`` returns the guest's typed status report (what ``timesync status`` shows)."""

    def __init__(self, send: Callable[[Frame], bool], status: Callable[[], StatusReport],
                 interval_s: float, min_interval_s: float = 1.0,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._send = send
        self._status = status
        self._clock = clock
        self.pacer = HealthPacer(interval_s, min_interval_s)
        self._check_s = min(min_interval_s, interval_s)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.last: HealthReport | None = None
        self.counters: Counter[str] = Counter()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="guest-health")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_task(self._task)  # bounded, and re-cancels should one be swallowed
            self._task = None

    def link_up(self) -> None:
        """A (re)connected relay gets a report right away."""
        self.pacer.reset()
        self._wake.set()

    def tick(self) -> bool:
        """Send a report if one is due; True if one was sent."""
        now = self._clock()
        status = self._status()
        state = status.state
        if not self.pacer.due(now, state):
            return False
        try:
            report = HealthReport.from_report(status)
            frame = report.frame()
        except (FramingError, TypeError, ValueError) as exc:  # never let a report hurt sync
            self.counters["encode_failed"] += 1
            log.warning("cannot encode health report: %s", exc,
                        extra={"event": "health_encode_failed"})
            self.pacer.sent(now, state)  # do not retry a broken report every second
            return False
        if not self._send(frame):
            self.counters["not_connected"] += 1
            return False
        self.pacer.sent(now, state)
        self.sent += 1
        self.last = report
        return True

    async def _run(self) -> None:
        while True:
            self.tick()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # not wait_for: on 3.11 it swallows a cancel landing after link_up() woke it
                async with asyncio.timeout(self._check_s):
                    await self._wake.wait()
