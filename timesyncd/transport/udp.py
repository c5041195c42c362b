"""A connected UDP endpoint for NTP upstreams.

Connecting the socket makes the kernel drop datagrams from other peers; we check the source
address again anyway (some loops report it) and count what we drop. The receive time is taken
on a monotonic clock as the datagram is handed to us, for residence-time measurement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

from timesyncd.addresses import Address, parse_address
from timesyncd.transport.errors import TransportError

DatagramCallback = Callable[[bytes, int], None]
ErrorCallback = Callable[[str], None]


class UdpEndpoint(asyncio.DatagramProtocol):
    """Calls ``on_datagram(data, rx_monotonic_ns)`` for each datagram from the peer;
    ``on_error(reason)`` for ICMP errors; counts foreign datagrams in ``foreign``."""

    def __init__(self, on_datagram: DatagramCallback, on_error: ErrorCallback | None) -> None:
        self._on_datagram = on_datagram
        self._on_error = on_error
        self._transport: asyncio.DatagramTransport | None = None
        self.peer: tuple[Any, ...] = ()
        self.foreign = 0

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.peer = tuple(transport.get_extra_info("peername") or ())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        rx_ns = time.monotonic_ns()
        if addr is not None and tuple(addr)[:2] != self.peer[:2]:
            self.foreign += 1
            return
        self._on_datagram(data, rx_ns)

    def error_received(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(type(exc).__name__)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    # API
    def send(self, data: bytes) -> int:
        """Send one datagram; return the monotonic time just after handing it to the kernel."""
        if self._transport is None:
            raise TransportError("closed", "UDP endpoint is closed")
        self._transport.sendto(data)
        return time.monotonic_ns()

    @property
    def closed(self) -> bool:
        return self._transport is None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


async def open_udp(
    remote: Address | str, on_datagram: DatagramCallback,
    on_error: ErrorCallback | None = None,
) -> UdpEndpoint:
    """Open a UDP socket connected to ``remote`` (``udp:HOST:PORT``)."""
    addr = parse_address(remote) if isinstance(remote, str) else remote
    if addr.kind != "udp":
        raise TransportError("bad_address", f"{addr} is not a udp: address")
    loop = asyncio.get_running_loop()
    try:
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: UdpEndpoint(on_datagram, on_error), remote_addr=(addr.host, addr.port)
        )
    except OSError as exc:
        raise TransportError("os_error", f"open {addr}: {exc.strerror or exc}") from exc
    return endpoint
