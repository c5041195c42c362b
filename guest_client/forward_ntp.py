"""``--forward-ntp``: plain NTP inside the guest, answered through the relay.

Unmodified NTP clients (chronyd, ntpd, ntplib) in a guest without network can point at this
UDP endpoint; each request goes over the relay link to its first upstream and the reply comes
back byte for byte, so the client does its own timestamping and validation. The table of
requests awaiting replies is bounded, and so is the rate passed to the relay (a busy or
broken local client must not push this guest over the relay's own limits and get its link,
and with it the guest's time, cut off); excess requests are dropped and counted (NTP clients
retry), never queued without limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Protocol

from guest_client.relay_link import RelayFailure, RelayReply, ReplyCallback, Upstream
from timesyncd.addresses import parse_address
from timesyncd.packet import HEADER_LEN, MAX_PACKET_LEN, Mode
from timesyncd.ratelimit import TokenBucket

log = logging.getLogger(__name__)


class RequestSender(Protocol):
    upstreams: list[Upstream]

    def send(self, upstream: int, packet: bytes, callback: ReplyCallback) -> int | None: ...


class NtpForwarder(asyncio.DatagramProtocol):
    def __init__(self, address: str, link: RequestSender, max_pending: int = 256,
                 rate_limit: float = 8.0) -> None:
        self.address = parse_address(address)
        if self.address.kind != "udp":
            raise ValueError(f"forward_ntp: {address!r} is not udp:HOST:PORT")
        self._link = link
        self.max_pending = max_pending
        self._transport: asyncio.DatagramTransport | None = None
        self.pending = 0
        self._bucket = TokenBucket(rate_limit, max(2 * rate_limit, 1.0), time.monotonic_ns())
        self.counters: Counter[str] = Counter()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.address.host, self.address.port)
        )

    @property
    def bound(self) -> tuple[Any, ...]:
        """Actual (host, port), e.g. after binding port 0."""
        assert self._transport is not None
        return tuple(self._transport.get_extra_info("sockname"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not HEADER_LEN <= len(data) <= MAX_PACKET_LEN or data[0] & 7 != Mode.CLIENT:
            self.counters["not_client_request"] += 1
            return
        if self.pending >= self.max_pending:
            self.counters["busy"] += 1
            return
        if not self._bucket.take(time.monotonic_ns()):
            self.counters["rate_limited"] += 1
            return
        if not self._link.upstreams:
            self.counters["relay_down"] += 1
            return
        upstream = self._link.upstreams[0].index
        rid = self._link.send(upstream, data, lambda result: self._done(result, addr))
        if rid is None:
            self.counters["relay_down"] += 1
            return
        self.pending += 1
        self.counters["forwarded"] += 1

    def _done(self, result: RelayReply | RelayFailure, addr: Any) -> None:
        self.pending -= 1
        if isinstance(result, RelayFailure):
            self.counters[f"failed_{result.reason}"] += 1
            return
        if self._transport is None:
            return
        self._transport.sendto(result.packet, addr)
        self.counters["answered"] += 1

    def error_received(self, exc: Exception) -> None:
        self.counters[f"socket_{type(exc).__name__}"] += 1

    def stats(self) -> dict[str, Any]:
        return {"address": str(self.address), "pending": self.pending, **self.counters}
