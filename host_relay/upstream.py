"""One allowlisted NTP upstream: a shared connected UDP socket with request matching.

Nothing is rewritten: a reply belongs to the in-flight request whose transmit timestamp it
carries as its origin timestamp (RFC 5905's own cookie), and the socket is connected, so only
the upstream's address can answer. Unmatched datagrams are counted and dropped.

Hot-path economy: results go to one callback fixed at construction (no closure per request),
and timeouts need no timer per request: every request has the same timeout, so the in-flight
dict's insertion order is deadline order and one timer, armed for the oldest request, sweeps
the expired ones from the front. A cancelled request costs one dict delete.

The socket is a plain non-blocking connected socket watched with ``loop.add_reader`` rather
than a datagram transport: ``send`` goes straight to the kernel, and a read wake-up calls
``recv`` only while requests are in flight. A transport would turn the peer address of every
datagram into a ``(str, int)`` tuple (``inet_ntop``) and read until EAGAIN, one wasted
``recvmsg`` per exchange at one guest; the connected socket already drops other peers. The
loop's readiness is level-triggered, so a datagram left unread (nothing in flight, or the
per-wake-up bound reached) wakes the reader again on the next turn.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from host_relay.stats import RelayStats
from timesyncd.addresses import Address
from timesyncd.packet import MAX_PACKET_LEN
from timesyncd.transport import TransportError
from timesyncd.transport.errors import os_error_reason
from timesyncd.transport.udp import size_buffers

log = logging.getLogger(__name__)

#: SO_RCVBUF/SO_SNDBUF asked for: replies to a few thousand guests polling in step (a 48-byte
#: datagram costs ~800 bytes of buffer on Linux; the ~208 KiB default holds about 270).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

_XMT = slice(40, 48)  # transmit timestamp of a request
_ORG = slice(24, 32)  # origin timestamp of a reply
#: Datagrams read per wake-up at most, so a flooding upstream cannot starve the guests.
_READS_PER_WAKEUP = 256
#: Requests given up (timed out or cancelled) remembered for one more timeout, at most this
#: many, so that their late replies count as late rather than as unsolicited (forged-looking).
_GIVEN_UP_MEMORY = 4096


class UpstreamError(Exception):
    """A request that cannot be sent; ``reason`` is a counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Pending:
    """One request in flight; ``owner``, ``request_id`` and ``rx_ns`` are the caller's."""

    __slots__ = ("key", "owner", "request_id", "rx_ns", "sent_ns", "deadline_ns", "upstream")

    def __init__(self, key: bytes, owner: Any, request_id: int, rx_ns: int, sent_ns: int,
                 deadline_ns: int, upstream: Upstream) -> None:
        self.key = key
        self.owner = owner
        self.request_id = request_id
        self.rx_ns = rx_ns
        self.sent_ns = sent_ns
        self.deadline_ns = deadline_ns
        self.upstream = upstream


#: ``on_result(pending, reply or None, monotonic ns of the reply or failure, reason)``; reason
#: is ``""`` with a reply, else ``timeout``, ``unreachable`` or ``closed``.
ResultCallback = Callable[[Pending, bytes | None, int, str], None]


class Upstream:
    def __init__(self, index: int, address: Address, stats: RelayStats, timeout_s: float,
                 on_result: ResultCallback, *,
                 buffer_bytes: int = SOCKET_BUFFER_BYTES) -> None:
        self.index = index
        self.address = address
        self.name = str(address)
        self._stats = stats
        self._timeout_ns = int(timeout_s * 1e9)
        self._on_result = on_result
        self._buffer_bytes = buffer_bytes
        self._pending: dict[bytes, Pending] = {}
        self._given_up: dict[bytes, int] = {}  # transmit key -> forget after (monotonic ns)
        self._sock: socket.socket | None = None
        self._send: Callable[[bytes], int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        """Resolve, connect and watch the socket; raises ``TransportError`` on failure."""
        addr = self.address
        if addr.kind != "udp":
            raise TransportError("bad_address", f"{addr} is not a udp: address")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_DGRAM)
            family, _, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        except OSError as exc:
            raise TransportError("os_error", f"open {addr}: {exc.strerror or exc}") from exc
        try:
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            raise TransportError("os_error", f"open {addr}: {exc.strerror or exc}") from exc
        if self._buffer_bytes > 0:
            size_buffers(sock, self._buffer_bytes, str(addr))
        self._loop = loop
        self._sock = sock
        self._send = sock.send
        loop.add_reader(sock.fileno(), self._readable)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def foreign_datagrams(self) -> int:
        """Always 0: the socket is connected, so the kernel drops other peers' datagrams."""
        return 0

    @property
    def local_address(self) -> Any:
        """The socket's own address (where the upstream's replies go), or None if closed."""
        return self._sock.getsockname() if self._sock is not None else None

    @property
    def buffer_sizes(self) -> tuple[int, int]:
        """Effective (SO_RCVBUF, SO_SNDBUF) of the upstream socket."""
        sock = self._sock
        if sock is None:
            return 0, 0
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    def submit(self, packet: bytes, owner: Any, request_id: int, rx_ns: int) -> Pending:
        """Send ``packet`` (at least 48 bytes) now; the result callback gets the returned
        :class:`Pending` exactly once later, unless :meth:`cancel` is called first. A full
        send buffer or a pending ICMP error raises ``OSError``."""
        send = self._send
        if send is None:
            raise UpstreamError("upstream_closed", f"upstream {self.name} is not open")
        key = packet[_XMT]
        pending_map = self._pending
        if key in pending_map:
            raise UpstreamError(
                "duplicate_transmit", "a request with this transmit timestamp is in flight"
            )
        sent_ns = time.monotonic_ns()
        send(packet)
        pending = Pending(key, owner, request_id, rx_ns, sent_ns, sent_ns + self._timeout_ns,
                          self)
        pending_map[key] = pending
        self._stats.upstream_requests += 1
        if self._sweeper is None:
            self._arm(pending.deadline_ns)
        return pending

    def cancel(self, pending: Pending) -> None:
        """Forget a request whose requester went away; a reply to it counts as late."""
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
            self._give_up(pending.key, time.monotonic_ns())
        if not self._pending and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close(self) -> None:
        self._fail_all("closed")
        sock, self._sock, self._send = self._sock, None, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()

    # --- internals -------------------------------------------------------------------

    def _readable(self) -> None:
        """Read while requests are in flight (see the module doc), stamping each datagram."""
        sock = self._sock
        if sock is None:
            return
        recv = sock.recv
        on_datagram = self._on_datagram
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = recv(MAX_PACKET_LEN)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP error on the connected socket, e.g. refused
                self._on_error(os_error_reason(exc))
                return
            on_datagram(data, time.monotonic_ns())
            if not self._pending or self._sock is None:  # nothing expected, or closed
                return

    def _on_datagram(self, data: bytes, rx_ns: int) -> None:
        pending = self._pending.pop(data[_ORG], None) if len(data) >= 48 else None
        if pending is None:
            if len(data) >= 48 and self._given_up.pop(data[_ORG], None) is not None:
                self._stats.upstream_late += 1
            else:
                self._stats.upstream_unsolicited += 1
            return
        self._stats.upstream_replies += 1
        self._on_result(pending, data, rx_ns, "")

    def _arm(self, deadline_ns: int) -> None:
        assert self._loop is not None
        delay = max(deadline_ns - time.monotonic_ns(), 0) / 1e9
        self._sweeper = self._loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Expire every request past its deadline (they sit at the front), re-arm for the next."""
        self._sweeper = None
        now = time.monotonic_ns()
        pending_map = self._pending
        while pending_map:
            oldest = next(iter(pending_map.values()))
            if oldest.deadline_ns > now:
                self._arm(oldest.deadline_ns)
                return
            del pending_map[oldest.key]
            self._give_up(oldest.key, now)
            self._stats.upstream_timeouts += 1
            self._on_result(oldest, None, now, "timeout")

    def _give_up(self, key: bytes, now: int) -> None:
        """Remember a request nobody waits for any more (bounded, oldest forgotten first)."""
        given_up = self._given_up
        while given_up:
            first = next(iter(given_up))
            if given_up[first] > now and len(given_up) < _GIVEN_UP_MEMORY:
                break
            del given_up[first]
        given_up[key] = now + self._timeout_ns

    def _on_error(self, reason: str) -> None:
        # ICMP errors on a connected socket say the upstream is unreachable; fail fast.
        self._stats.upstream_errors += 1
        log.debug("upstream %s: %s; failing %d pending", self.name, reason, len(self._pending))
        self._fail_all("unreachable")

    def _fail_all(self, reason: str) -> None:
        """Stop the timeout sweep and report every pending request as failed with ``reason``."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        now = time.monotonic_ns()
        pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            self._on_result(p, None, now, reason)
