"""One allowlisted NTP upstream: a shared connected UDP socket with request matching.

Nothing is rewritten: a reply belongs to the in-flight request whose transmit timestamp it
carries as its origin timestamp (RFC 5905's own cookie), and the socket is connected, so only
the upstream's address can answer. Unmatched datagrams are counted and dropped. Callbacks,
not tasks, carry results: a cancelled request costs one dict delete and one timer cancel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from host_relay.stats import RelayStats
from timesyncd.addresses import Address
from timesyncd.transport import UdpEndpoint, open_udp

log = logging.getLogger(__name__)

#: ``on_result(reply or None, monotonic ns of the reply or failure, reason)``; reason is
#: ``""`` with a reply, else ``timeout``, ``unreachable`` or ``closed``.
ResultCallback = Callable[[bytes | None, int, str], None]

_XMT = slice(40, 48)  # transmit timestamp of a request
_ORG = slice(24, 32)  # origin timestamp of a reply


class UpstreamError(Exception):
    """A request that cannot be sent; ``reason`` is a counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False, slots=True)
class Pending:
    key: bytes
    on_result: ResultCallback | None
    sent_ns: int
    timer: asyncio.TimerHandle | None = None


class Upstream:
    def __init__(self, index: int, address: Address, stats: RelayStats, timeout_s: float) -> None:
        self.index = index
        self.address = address
        self.name = str(address)
        self._stats = stats
        self._timeout_s = timeout_s
        self._pending: dict[bytes, Pending] = {}
        self._endpoint: UdpEndpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._endpoint = await open_udp(self.address, self._on_datagram, self._on_error)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def foreign_datagrams(self) -> int:
        return self._endpoint.foreign if self._endpoint is not None else 0

    def submit(self, packet: bytes, on_result: ResultCallback) -> Pending:
        """Send ``packet`` (at least 48 bytes) now; ``on_result`` is called exactly once later
        unless :meth:`cancel` is called first."""
        if self._endpoint is None or self._endpoint.closed or self._loop is None:
            raise UpstreamError("upstream_closed", f"upstream {self.name} is not open")
        key = bytes(packet[_XMT])
        if key in self._pending:
            raise UpstreamError(
                "duplicate_transmit", "a request with this transmit timestamp is in flight"
            )
        sent_ns = self._endpoint.send(packet)
        pending = Pending(key, on_result, sent_ns)
        pending.timer = self._loop.call_later(self._timeout_s, self._expire, pending)
        self._pending[key] = pending
        self._stats.upstream_requests += 1
        return pending

    def cancel(self, pending: Pending) -> None:
        """Forget a request whose requester went away; a late reply is then unsolicited."""
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
        if pending.timer is not None:
            pending.timer.cancel()
        pending.on_result = None

    def close(self) -> None:
        for pending in list(self._pending.values()):
            self._finish(pending, None, time.monotonic_ns(), "closed")
        if self._endpoint is not None:
            self._endpoint.close()

    # --- internals -------------------------------------------------------------------

    def _finish(self, pending: Pending, reply: bytes | None, at_ns: int, reason: str) -> None:
        self._pending.pop(pending.key, None)
        if pending.timer is not None:
            pending.timer.cancel()
        callback, pending.on_result = pending.on_result, None
        if callback is not None:
            callback(reply, at_ns, reason)

    def _on_datagram(self, data: bytes, rx_ns: int) -> None:
        pending = self._pending.get(data[_ORG]) if len(data) >= 48 else None
        if pending is None:
            self._stats.upstream_unsolicited += 1
            return
        self._stats.upstream_replies += 1
        self._finish(pending, data, rx_ns, "")

    def _expire(self, pending: Pending) -> None:
        self._stats.upstream_timeouts += 1
        self._finish(pending, None, time.monotonic_ns(), "timeout")

    def _on_error(self, reason: str) -> None:
        # ICMP errors on a connected socket say the upstream is unreachable; fail fast.
        self._stats.upstream_errors += 1
        log.debug("upstream %s: %s; failing %d pending", self.name, reason, len(self._pending))
        now = time.monotonic_ns()
        for pending in list(self._pending.values()):
            self._finish(pending, None, now, "unreachable")
