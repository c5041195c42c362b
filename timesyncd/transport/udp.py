"""A connected UDP endpoint for NTP servers used directly (a guest's ``udp:`` sources).

Connecting the socket makes the kernel drop datagrams from other peers; we check the source
address again anyway and count what we drop. The socket is read with ``recvmsg`` under
``loop.add_reader`` rather than through the loop's datagram transport, because the stamps
travel as ancillary data, which the transport drops:

* receive: the kernel's stamp of the datagram's arrival (``kernel_stamps``), so a reply
  waiting in the socket for the process to be scheduled does not count as return-path delay;
* send: the kernel's transmit stamp (``TX_SCHED``: the packet entering the device layer,
  queued on the error queue inside the send call), so the send path (syscall and UDP/IP
  stack) no longer counts as outbound delay. Against ``chronyd -x`` on loopback the guest's
  mean offset went from +18 us to +3 us; a plain client stamping right before ``send()``
  reads +6 us, -2.3 us with this stamp (``bench/send_stamps.py``, docs/BENCHMARKS.md). The
  error queue is drained before each send and on every wake-up, so a late stamp cannot leave
  the socket signalling EPOLLERR. A stamp that comes after the send call (the first packet
  to a neighbour not yet resolved) stops uvloop's watcher until the next send drains it and
  re-arms the reader: at most that exchange is lost; asyncio calls the reader and drains.

Without a stamp (kernel refuses, stamp late or implausible) the times are user-space: just
before the send, when the datagram is read, both on the honest side of the truth. uvloop's
watcher may stop firing after a socket error (see ``host_relay/upstream.py``), so the reader
is re-armed after one.

:func:`size_buffers` serves the relay's upstream socket: a relay sends one request per guest on
one socket, so replies to guests polling in step arrive together, and it raises
SO_RCVBUF/SO_SNDBUF beyond Linux's ~208 KiB default (about 270 small datagrams), which would
otherwise drop replies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from timesyncd.addresses import Address, parse_address
from timesyncd.packet import MAX_PACKET_LEN
from timesyncd.transport import kernel_stamps
from timesyncd.transport.errors import TransportError, os_error_reason

log = logging.getLogger(__name__)

DatagramCallback = Callable[[bytes, int], None]
ErrorCallback = Callable[[str], None]

#: Linux SO_RCVBUFFORCE / SO_SNDBUFFORCE: exceed net.core.[rw]mem_max with CAP_NET_ADMIN.
_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform == "linux" else {}
#: datagrams read per wake-up at most (the loop's other work is not held up by a flood)
_READS_PER_WAKE = 64


class UdpEndpoint:
    """Calls ``on_datagram(data, rx_monotonic_ns)`` for each datagram from the peer and
    ``on_error(reason)`` for socket errors (ICMP); counts foreign datagrams in ``foreign``,
    receive times that are the kernel's stamp in ``kernel_stamped``, send times that are the
    kernel's in ``kernel_tx_stamped`` and transmit stamps that came too late in ``tx_late``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_datagram: DatagramCallback, on_error: ErrorCallback | None) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._on_datagram = on_datagram
        self._on_error = on_error
        self.peer: tuple[Any, ...] = tuple(sock.getpeername())
        self._peer_host, self._peer_port = self.peer[0], self.peer[1]
        self.foreign = 0
        self.kernel_stamped = 0
        self.kernel_tx_stamped = 0
        self.tx_late = 0
        self.tx_stamps = kernel_stamps.enable_tx_stamps(sock)
        if not self.tx_stamps:
            kernel_stamps.enable_rx_stamps(sock)
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, data: bytes) -> int:
        """Send one datagram; return when it left, in monotonic ns: the kernel's transmit
        stamp when there is one inside the call, else the time just before the call."""
        sock = self._sock
        if sock is None:
            raise TransportError("closed", "UDP endpoint is closed")
        if self.tx_stamps:
            self._drain_late_stamps()
        sent_ns = time.monotonic_ns()
        try:
            sock.send(data)
        except OSError as exc:  # a pending ICMP error, or a full send buffer: reported
            self._report(exc)
            self._rearm()  # the error may have stopped uvloop's watcher before we read it
            return sent_ns
        if not self.tx_stamps:
            return sent_ns
        returned_ns = time.monotonic_ns()
        stamp, _ = kernel_stamps.drain_tx_stamps(sock)
        kernel = kernel_stamps.tx_to_monotonic(stamp, sent_ns, returned_ns)
        if kernel is None:
            return sent_ns
        self.kernel_tx_stamped += 1
        return kernel

    def _drain_late_stamps(self) -> None:
        """Stamps still queued belong to earlier sends: read and count them. Left there, they
        keep the socket in EPOLLERR: asyncio would call the reader in a busy loop, and libuv
        stops uvloop's watcher on it, so after reading some the reader is re-armed."""
        assert self._sock is not None
        _, read = kernel_stamps.drain_tx_stamps(self._sock)
        if read:
            self.tx_late += read
            self._rearm()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if self.tx_stamps:
            self._drain_late_stamps()
        for _ in range(_READS_PER_WAKE):
            try:
                data, anc, _flags, addr = sock.recvmsg(MAX_PACKET_LEN + 1,
                                                       kernel_stamps.CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._report(exc)
                self._rearm()
                return
            rx_ns = time.monotonic_ns()
            if addr is not None and (addr[1] != self._peer_port or addr[0] != self._peer_host):
                self.foreign += 1
                continue
            kernel = kernel_stamps.to_monotonic(kernel_stamps.stamp_from_ancillary(anc),
                                                kernel_stamps.realtime_offset_ns(), rx_ns)
            if kernel != rx_ns:
                self.kernel_stamped += 1
            self._on_datagram(data, kernel)
            if self._sock is None:  # the callback closed us
                return

    def _report(self, exc: OSError) -> None:
        if self._on_error is not None:
            self._on_error(os_error_reason(exc))

    def _rearm(self) -> None:
        """Watch the socket afresh: uvloop's watcher can stay silent after an error."""
        if self._sock is not None:
            fd = self._sock.fileno()
            self._loop.remove_reader(fd)
            self._loop.add_reader(fd, self._readable)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()


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
        infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError("resolve_failed", f"resolve {addr}: {exc}") from exc
    last: OSError | None = None
    for family, kind, proto, _name, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.connect(sockaddr)  # UDP: no handshake, completes at once
            return UdpEndpoint(loop, sock, on_datagram, on_error)
        except OSError as exc:
            sock.close()
            last = exc
    message = last.strerror if last is not None and last.strerror else str(last)
    raise TransportError("os_error", f"open {addr}: {message or 'no address'}")
