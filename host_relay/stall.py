"""Notice that the relay's event loop stood still (SIGSTOP, a frozen VM, swap), so that what
was queued meanwhile is judged by its age rather than forwarded as if it were fresh.

A stream socket gives no receive time per frame: after a stall, frames sent a minute ago and
frames sent a millisecond ago are read in the same turn with the same stamp. A heartbeat timer
ticks every ``period_s``; a turn that finds the last tick older than ``threshold_s`` is a
catch-up turn (the loop may run I/O before or after the overdue timer, so both orders are
recognised), and each connection's first read in it carries frames of unknown age up to the
stall's length. The caller decides what is stale; this module only measures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Reads this soon after a stall was noticed still count as its catch-up.
_CATCHUP_WINDOW_NS = 500_000_000


class StallWatch:
    def __init__(self, period_s: float = 0.1, threshold_s: float = 1.0,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self.period_s = period_s
        self.threshold_ns = int(threshold_s * 1e9)
        self.stalls = 0  # stalls noticed; also the id of the latest one
        self.last_gap_ns = 0
        self._ended_ns = 0
        #: reads up to this time belong to the latest stall's catch-up
        self.catchup_until_ns = 0
        self.last_tick_ns = self._clock()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.last_tick_ns = self._clock()
        self._timer = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        now = self._clock()
        gap = now - self.last_tick_ns
        if gap > self.threshold_ns:
            self._noticed(now, gap)
        self.last_tick_ns = now
        self._timer = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def _noticed(self, now: int, gap: int) -> None:
        self.stalls += 1
        self.last_gap_ns = gap
        self._ended_ns = now
        self.catchup_until_ns = now + _CATCHUP_WINDOW_NS
        log.warning("relay event loop stood still for %.1f s (stopped or starved); requests "
                    "queued meanwhile are judged by age", gap / 1e9,
                    extra={"event": "relay_stalled", "seconds": round(gap / 1e9, 3)})

    def suspect(self, rx_ns: int) -> bool:
        """Cheap pre-check for the hot path: only then is :meth:`catchup` worth calling."""
        return rx_ns - self.last_tick_ns > self.threshold_ns or rx_ns <= self.catchup_until_ns

    def catchup(self, rx_ns: int) -> tuple[int, int]:
        """``(stall id, gap ns)`` if a read at ``rx_ns`` belongs to a stall's catch-up,
        else ``(0, 0)``."""
        behind = rx_ns - self.last_tick_ns
        if behind > self.threshold_ns:  # the overdue tick has not run yet: it is this one
            self._noticed(rx_ns, behind)
            self.last_tick_ns = rx_ns
            return self.stalls, behind
        if self.stalls and rx_ns - self._ended_ns <= _CATCHUP_WINDOW_NS:
            return self.stalls, self.last_gap_ns
        return 0, 0
