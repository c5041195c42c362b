"""A connected UDP endpoint for NTP upstreams.

Connecting the socket makes the kernel drop datagrams from other peers; we check the source
address again anyway (some loops report it) and count what we drop. The receive time is the
kernel's stamp of the datagram's arrival where it gives one (``kernel_stamps.last_stamp_ns``),
else the monotonic time the datagram is handed to us: a reply waiting in the socket for the
process to be scheduled would otherwise count as return-path delay and bias the offset. The
send time is taken just before the datagram is handed to the kernel.

A relay sends one request per guest on one socket, so replies to guests polling in step arrive
together: :func:`size_buffers` raises SO_RCVBUF/SO_SNDBUF beyond Linux's ~208 KiB default
(about 270 small datagrams), which would otherwise drop replies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from timesyncd.addresses import Address, parse_address
from timesyncd.transport import kernel_stamps
from timesyncd.transport.errors import TransportError, os_error_reason

log = logging.getLogger(__name__)

DatagramCallback = Callable[[bytes, int], None]
ErrorCallback = Callable[[str], None]

#: Linux SO_RCVBUFFORCE / SO_SNDBUFFORCE: exceed net.core.[rw]mem_max with CAP_NET_ADMIN.
_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform == "linux" else {}


class UdpEndpoint(asyncio.DatagramProtocol):
    """Calls ``on_datagram(data, rx_monotonic_ns)`` for each datagram from the peer;
    ``on_error(reason)`` for ICMP errors; counts foreign datagrams in ``foreign``, and the
    datagrams whose receive time is the kernel's stamp in ``kernel_stamped``."""

    def __init__(self, on_datagram: DatagramCallback, on_error: ErrorCallback | None) -> None:
        self._on_datagram = on_datagram
        self._on_error = on_error
        self._transport: asyncio.DatagramTransport | None = None
        self._sendto: Callable[[bytes], None] | None = None
        self.peer: tuple[Any, ...] = ()
        self._peer_host: Any = None
        self._peer_port: Any = None
        self.foreign = 0
        self.kernel_stamped = 0
        self._fd = -1
        self._last_stamp: int | None = None

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self._transport.sendto
        self.peer = tuple(transport.get_extra_info("peername") or ())
        if len(self.peer) >= 2:
            self._peer_host, self._peer_port = self.peer[0], self.peer[1]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            kernel_stamps.last_stamp_ns(self._fd)  # switches the socket's stamping on

    def datagram_received(self, data: bytes, addr: Any) -> None:
        rx_ns = time.monotonic_ns()
        if addr is not None and (addr[1] != self._peer_port or addr[0] != self._peer_host):
            self.foreign += 1
            return
        if self._fd >= 0:
            stamp = kernel_stamps.last_stamp_ns(self._fd)
            if stamp is not None and stamp != self._last_stamp:  # never one stamp twice
                self._last_stamp = stamp
                kernel = kernel_stamps.to_monotonic(stamp, kernel_stamps.realtime_offset_ns(),
                                                    rx_ns)
                if kernel != rx_ns:
                    self.kernel_stamped += 1
                    rx_ns = kernel
        self._on_datagram(data, rx_ns)

    def error_received(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(os_error_reason(exc) if isinstance(exc, OSError) else "error")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._sendto = None
        self._fd = -1

    # API
    def send(self, data: bytes) -> int:
        """Send one datagram; return the monotonic time just before handing it to the kernel."""
        sendto = self._sendto
        if sendto is None:
            raise TransportError("closed", "UDP endpoint is closed")
        sent_ns = time.monotonic_ns()
        sendto(data)
        return sent_ns

    @property
    def closed(self) -> bool:
        return self._transport is None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._sendto = None
            self._fd = -1


def _set_buffer(sock: Any, option: int, size: int) -> None:
    """Ask for ``size`` bytes, forcing past the sysctl cap when privileged; else the cap."""
    force = _FORCE.get(option)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return
        except OSError:
            pass  # no CAP_NET_ADMIN: the plain option is capped at net.core.[rw]mem_max
    sock.setsockopt(socket.SOL_SOCKET, option, size)


def size_buffers(sock: Any, size: int, label: str) -> None:
    """Ask for ``size``-byte receive and send buffers (best effort), and warn when the kernel
    granted less: replies to many guests polling at once would then be dropped."""
    try:
        _set_buffer(sock, socket.SO_RCVBUF, size)
        _set_buffer(sock, socket.SO_SNDBUF, size)
    except OSError as exc:
        log.warning("%s: could not size socket buffers: %s", label, exc)
    rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if rcv < size:  # Linux reports twice the requested size when granted
        log.warning("%s: receive buffer is %d bytes, asked for %d (raise net.core.rmem_max or "
                    "grant CAP_NET_ADMIN); replies to many guests polling at once may be "
                    "dropped", label, rcv, size)


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
        transport, endpoint = await loop.create_datagram_endpoint(
            lambda: UdpEndpoint(on_datagram, on_error), remote_addr=(addr.host, addr.port)
        )
    except OSError as exc:
        raise TransportError("os_error", f"open {addr}: {exc.strerror or exc}") from exc
    return endpoint
