"""One relay connection's pieces for :mod:`guest_client.relay_link`: the transport protocol that
stamps arrivals, and the outcome the driver's task awaits (HELLO answered, then ended)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from guest_client.link_protocol import RelayProtocolError, Upstream


class SessionWire(asyncio.Protocol):
    """The transport's protocol for one session. :meth:`data_received` is the one place
    receive stamps are taken: when the transport hands the bytes over, before any task runs."""

    def __init__(self, clock: Callable[[], int], on_data: Callable[[bytes, int], None],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self._clock = clock
        self._on_data = on_data
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self._on_data(data, self._clock())

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)


class LinkSession:
    """One connection's outcome for the driver's task: HELLO answered, then ended."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[list[Upstream]] = loop.create_future()
        self.ended: asyncio.Future[str] = loop.create_future()

    def fail(self, exc: BaseException) -> None:
        for fut in (self.hello, self.ended):
            if not fut.done():
                fut.set_exception(exc)
                return

    def end(self, reason: str) -> None:
        if not self.hello.done():
            self.hello.set_exception(RelayProtocolError("closed", reason))
        elif not self.ended.done():
            self.ended.set_result(reason)
