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

Recovery: an error on the socket (an ICMP port unreachable while the upstream restarts, a
failed send) closes it and opens a fresh one, because uvloop stops calling a reader after an
error on a connected UDP socket and never delivers that socket's datagrams again. A request
timing out while datagrams wait unread (``SIOCINQ > 0``) means the watcher died anyway: it is
re-registered and the queue drained, logged once per episode. Timeouts in a row re-resolve a
name and move to the new address if it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import socket
import termios
import time
from collections.abc import Callable
from typing import Any

from host_relay.stats import RelayStats
from timesyncd.addresses import Address
from timesyncd.logs import decade
from timesyncd.packet import MAX_PACKET_LEN
from timesyncd.transport import TransportError, kernel_stamps
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
#: Timeouts in a row (no reply in between) that make a named upstream be resolved again.
_RESOLVE_AFTER_TIMEOUTS = 3


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
                 buffer_bytes: int = SOCKET_BUFFER_BYTES,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock  # monotonic ns: stamps and timeouts (injected for virtual time)
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
        self._target: tuple[int, int, Any] | None = None  # family, proto, sockaddr
        self._resolving: asyncio.Task[None] | None = None
        self._closing = False
        self._timeouts_in_row = 0
        #: socket replacements and reader repairs (recovery from faults), for status
        self.reopens = 0
        self.repairs = 0
        #: kernel receive stamps in use ("timestamping", "timestampns"; "": user-space only)
        self.stamping = ""

    async def open(self) -> None:
        """Resolve, connect and watch the socket; raises ``TransportError`` on failure."""
        addr = self.address
        if addr.kind != "udp":
            raise TransportError("bad_address", f"{addr} is not a udp: address")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._target = await self._resolve()
        self._connect()

    async def _resolve(self) -> tuple[int, int, Any]:
        addr = self.address
        assert self._loop is not None
        try:
            infos = await self._loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError("os_error", f"resolve {addr}: {exc.strerror or exc}") from exc
        family, _, proto, _, sockaddr = infos[0]
        return family, proto, sockaddr

    def _connect(self) -> None:
        """A fresh connected socket to the resolved target, watched by the loop."""
        addr = self.address
        assert self._target is not None and self._loop is not None
        family, proto, sockaddr = self._target
        try:
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
        self.stamping = kernel_stamps.enable_rx_stamps(sock)
        self._sock = sock
        self._send = sock.send
        self._loop.add_reader(sock.fileno(), self._readable)

    def _drop_socket(self) -> None:
        sock, self._sock, self._send = self._sock, None, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()

    def _reopen(self, why: str) -> None:
        """Replace the socket after an error (see the module doc); a failure to open leaves
        it closed, and the next request (or re-resolve) tries again."""
        if self._closing:
            return
        self._stats.upstream_reopens += 1
        self.reopens += 1
        if decade(self.reopens):
            log.info("upstream %s: reopening its socket after %s (%d reopens)", self.name, why,
                     self.reopens, extra={"event": "upstream_reopen", "upstream": self.name,
                                          "reason": why, "count": self.reopens})
        self._drop_socket()
        self._maybe_resolve()  # a restarted upstream may have come back elsewhere
        try:
            self._connect()
        except TransportError as exc:
            log.warning("upstream %s: %s", self.name, exc,
                        extra={"event": "upstream_open_failed", "upstream": self.name})

    def _open_again(self) -> Callable[[bytes], int]:
        """The socket could not be reopened after an error: try once more, now."""
        if self._closing or self._target is None or self._loop is None:
            raise UpstreamError("upstream_closed", f"upstream {self.name} is not open")
        try:
            self._connect()
        except TransportError as exc:
            self._maybe_resolve()
            raise UpstreamError("upstream_closed", str(exc)) from exc
        assert self._send is not None
        return self._send

    def _maybe_resolve(self) -> None:
        """Resolve a name again in the background; move to its new address if it changed."""
        if self._resolving is not None or self._closing or self._loop is None:
            return
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(self.address.host)
            return  # a literal address cannot change
        self._resolving = self._loop.create_task(self._re_resolve())

    async def _re_resolve(self) -> None:
        try:
            target = await self._resolve()
        except TransportError as exc:
            log.debug("upstream %s: %s", self.name, exc)
            return
        finally:
            self._resolving = None
        if self._closing:
            return
        if target != self._target or self._sock is None:
            if target != self._target:
                log.warning("upstream %s: now resolves to %s", self.name, target[2][0],
                            extra={"event": "upstream_moved", "upstream": self.name})
            self._target = target
            self._reopen("address change" if self._sock is not None else "reopen failure")

    def _inq(self) -> int:
        """Bytes waiting in the socket's receive queue (SIOCINQ)."""
        sock = self._sock
        if sock is None:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4),
                                  "little")
        except OSError:
            return 0

    def _repair_reader(self) -> None:
        """Datagrams wait while requests time out: the loop stopped watching the socket."""
        sock = self._sock
        if sock is None or self._loop is None:
            return
        self._stats.upstream_reader_repairs += 1
        self.repairs += 1
        if decade(self.repairs):
            log.warning("upstream %s: replies waiting unread while requests time out; "
                        "re-registering the reader (%d repairs)", self.name, self.repairs,
                        extra={"event": "upstream_reader_stalled", "upstream": self.name,
                               "count": self.repairs})
        self._loop.remove_reader(sock.fileno())
        self._loop.add_reader(sock.fileno(), self._readable)
        self._readable()

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
        :class:`Pending` exactly once later, unless :meth:`cancel` is called first. A request
        that cannot be sent (closed, full send buffer, pending ICMP error) raises
        :class:`UpstreamError`."""
        send = self._send
        if send is None:
            send = self._open_again()
        key = packet[_XMT]
        pending_map = self._pending
        if key in pending_map:
            raise UpstreamError(
                "duplicate_transmit", "a request with this transmit timestamp is in flight"
            )
        sent_ns = self._clock()
        try:
            send(packet)
        except BlockingIOError as exc:  # send buffer full: nothing wrong with the socket
            raise UpstreamError("send_failed", f"upstream {self.name}: {exc}") from exc
        except OSError as exc:  # a pending ICMP error, or worse: start again on a new socket
            self._fail_all("unreachable")
            self._reopen(type(exc).__name__)
            raise UpstreamError("send_failed", f"upstream {self.name}: "
                                f"{exc.strerror or exc}") from exc
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
            self._give_up(pending.key, self._clock())
        if not self._pending and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close(self) -> None:
        self._closing = True
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        self._fail_all("closed")
        self._drop_socket()

    # --- internals -------------------------------------------------------------------

    def _readable(self) -> None:
        """Read while requests are in flight (see the module doc), stamping each datagram with
        the kernel's receive stamp where there is one (``kernel_stamps``)."""
        sock = self._sock
        if sock is None:
            return
        if not self.stamping:
            self._read_plain(sock)
            return
        recvmsg = sock.recvmsg
        on_datagram = self._on_datagram
        rt_offset = kernel_stamps.realtime_offset_ns()
        stamp, to_mono = kernel_stamps.stamp_from_ancillary, kernel_stamps.to_monotonic
        space = kernel_stamps.CMSG_SPACE
        for _ in range(_READS_PER_WAKEUP):
            try:
                data, anc, _flags, _addr = recvmsg(MAX_PACKET_LEN, space)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP error on the connected socket, e.g. refused
                reason = os_error_reason(exc)
                self._on_error(reason)
                self._reopen(reason)
                return
            on_datagram(data, to_mono(stamp(anc), rt_offset, time.monotonic_ns()))
            if not self._pending or self._sock is None:  # nothing expected, or closed
                return

    def _read_plain(self, sock: socket.socket) -> None:
        """:meth:`_readable` without kernel stamps: the user-space stamp on reading."""
        recv = sock.recv
        on_datagram = self._on_datagram
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = recv(MAX_PACKET_LEN)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP error on the connected socket, e.g. refused
                reason = os_error_reason(exc)
                self._on_error(reason)
                self._reopen(reason)
                return
            on_datagram(data, self._clock())
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
        self._timeouts_in_row = 0
        self._on_result(pending, data, rx_ns, "")

    def _arm(self, deadline_ns: int) -> None:
        assert self._loop is not None
        delay = max(deadline_ns - self._clock(), 0) / 1e9
        self._sweeper = self._loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Expire every request past its deadline (they sit at the front), re-arm for the next;
        then, if replies wait unread, the reader died: repair it (those replies are late, of
        unknown age, so they were not matched first)."""
        self._sweeper = None
        now = self._clock()
        pending_map = self._pending
        expired = 0
        while pending_map:
            oldest = next(iter(pending_map.values()))
            if oldest.deadline_ns > now:
                break
            del pending_map[oldest.key]
            self._give_up(oldest.key, now)
            expired += 1
            self._stats.upstream_timeouts += 1
            self._timeouts_in_row += 1
            if self._timeouts_in_row % _RESOLVE_AFTER_TIMEOUTS == 0:
                self._maybe_resolve()
            self._on_result(oldest, None, now, "timeout")
        if expired and self._inq() > 0:
            self._repair_reader()
        if pending_map and self._sweeper is None:
            self._arm(next(iter(pending_map.values())).deadline_ns)

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
        now = self._clock()
        pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            self._on_result(p, None, now, reason)
