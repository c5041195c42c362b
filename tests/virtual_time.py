"""An asyncio loop in virtual time, for pacing, rate-limit and timeout tests.

Its clock starts at 0 and only moves when nothing is ready to run: then it jumps to the next
timer. Real I/O still works (polled without blocking), so only tests whose peers live in the
same loop belong here. ``loop.clock_ns`` is the same time in integer nanoseconds, for the
``clock=`` parameters of the code under test. A loaded machine cannot change the outcome.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._vloop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout is not None and timeout > 0:
            self._vloop.now += timeout  # nothing to do until the next timer: skip to it
        elif not ready and timeout is None:
            ready = super().select(0.01)  # no timers at all: only real I/O can wake us
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now

    def clock_ns(self) -> int:
        return round(self.now * 1e9)


def run_virtual(main: Callable[[VirtualTimeLoop], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(loop)`` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(main(loop))
    finally:
        loop.close()
