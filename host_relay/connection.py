"""One guest stream as an ``asyncio.Protocol``: cut frames, enforce per-connection limits,
write frames back, and tear down cleanly.

A protocol rather than a StreamReader task: bytes are handled in ``data_received`` in the same
loop turn they arrive, with no task wake-up per read, and the receive time is stamped before
anything else. Frames are cut straight from the received bytes; only a partial frame at the
end is kept for the next read. What the frames *mean* is the owner's business (the relay
service, through :class:`ConnectionOwner`); this module only knows sizes, deadlines and the
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameType, FramingError
from timesyncd.ratelimit import TokenBucket

if TYPE_CHECKING:
    from host_relay.stats import RelayStats
    from host_relay.upstream import Pending

log = logging.getLogger(__name__)

#: A guest that stops reading its replies is dropped once this much is queued for it.
MAX_WRITE_BUFFER = 256 * 1024
#: How long a closing connection may take to flush its last frames before it is aborted.
CLOSE_GRACE_S = 1.0
FRAME_NAMES = {t.value: t.name for t in FrameType}
_FRAME_TYPES = frozenset(FRAME_NAMES)
_HEADER = framing.HEADER
_HEADER_SIZE = framing.HEADER.size
_NTP_REQUEST = int(FrameType.NTP_REQUEST)
_VERSION = framing.VERSION
#: NTP_REPLY frame head: frame header + residence in/out (``framing.ntp_reply`` in one pack).
REPLY_HEAD = struct.Struct(_HEADER.format + "II")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_payload: int  # bytes after the frame header
    idle_ns: int
    hello_ns: int
    rate: float  # requests per second (token bucket)
    burst: int

    @property
    def frame_rate(self) -> float:
        """Frames of any kind per second before a connection counts as a flood: well above
        what a guest sends (requests, a health report, NTS-KE stream data), so only abuse
        reaches it. Frames that get no answer (HEALTH, STREAM_CLOSE) cost the relay CPU too."""
        return 8 * self.rate + 16

    @property
    def frame_burst(self) -> int:
        return 8 * self.burst + 256


class ConnectionOwner(Protocol):
    """What a connection reports to (the relay service)."""

    def accept(self, conn: GuestConnection) -> bool:
        """A new connection: False refuses it (the connection writes BUSY and closes)."""

    def on_ntp_request(self, conn: GuestConnection, request_id: int, data: bytes, start: int,
                       end: int, rx_ns: int) -> None:
        """NTP_REQUEST after HELLO; its payload is ``data[start:end]`` (not copied)."""

    def on_frame(self, conn: GuestConnection, frame: framing.Frame, rx_ns: int) -> None:
        """Any other frame (HELLO, HEALTH, STREAM_*, ...)."""

    def on_closing(self, conn: GuestConnection) -> None:
        """The connection is being closed: drop its in-flight work (no reply may follow)."""

    def on_gone(self, conn: GuestConnection) -> None:
        """The transport is gone (fd closed); called once, after :meth:`on_closing`."""


class GuestConnection(asyncio.Protocol):
    """Per-guest state: limits, in-flight requests (``pending``), HELLO state and name."""

    def __init__(self, owner: ConnectionOwner, stats: RelayStats, limits: ConnectionLimits,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.owner = owner
        self.stats = stats
        self.limits = limits
        #: monotonic ns for stamps, rate limits and deadlines: injected so tests run virtual time
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.name = ""
        self.peer_key: str | None = None  # set by the owner on accept (per-guest limit)
        self.peer_id: str | None = None  # ... and the guest's identity ("" if anonymous)
        self.hello_done = False
        self.closed = False
        #: requests in flight upstream, cancelled when the connection closes
        self.pending: set[Pending] = set()
        self.stale_ns = 0  # the guest's request deadline if its HELLO said (0: the relay's)
        self.catchup_stall = 0  # the relay stall whose catch-up read this connection had
        self.catchup_rx_ns = 0  # ... and that read's stamp
        now = clock()
        self.bucket = TokenBucket(limits.rate, limits.burst, now)
        self.frames = TokenBucket(limits.frame_rate, limits.frame_burst, now)
        self.deadline_ns = now + limits.hello_ns
        self._buf = b""  # an incomplete frame from the previous read
        self._accepted = False
        self._lost = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.owner.accept(self):
            self.stats.connections_refused += 1
            self.send_frame(framing.error(0, ErrorCode.BUSY, "relay at max_connections, "
                                          "max_connections_per_guest or its descriptor "
                                          "limit"))
            self.closed = True
            self.transport.close()
            return
        self._accepted = True
        self.stats.connections_accepted += 1
        self.stats.connections_open += 1
        self.transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER)
        self._arm_watchdog()

    def data_received(self, data: bytes) -> None:
        rx_ns = self.clock()
        if self.closed:
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self.hello_done:
            self.deadline_ns = rx_ns + self.limits.idle_ns
        n = len(data)
        off = 0
        max_payload = self.limits.max_payload
        owner = self.owner
        unpack = _HEADER.unpack_from
        take_frame = self.frames.take
        try:
            while n - off >= _HEADER_SIZE:
                version, ftype, length, rid = unpack(data, off)
                if version != _VERSION:
                    raise FramingError("bad_version",
                                       f"frame version {version}, expected {framing.VERSION}")
                if ftype not in _FRAME_TYPES:
                    raise FramingError("bad_type", f"unknown frame type {ftype}")
                if length > max_payload:
                    raise FramingError("oversized", f"payload {length} bytes")
                start = off + _HEADER_SIZE
                end = start + length
                if end > n:
                    break
                off = end
                if not take_frame(rx_ns):
                    raise FramingError("frame_flood", "frames far beyond the rate limit")
                if ftype == _NTP_REQUEST and self.hello_done:
                    owner.on_ntp_request(self, rid, data, start, end, rx_ns)
                else:
                    owner.on_frame(self, framing.Frame(ftype, rid, data[start:end]), rx_ns)
                if self.closed:
                    return
        except FramingError as exc:
            self.stats.errors[exc.reason] += 1
            log.debug("closing %s: %s", self.name or "guest", exc)
            self.send_frame(framing.error(0, ErrorCode.BAD_FRAME, str(exc)))
            self.close()
            return
        if off < n:
            self._buf = data[off:]

    def eof_received(self) -> bool | None:
        self.close()  # the guest is done sending: its in-flight requests are dropped
        return None

    def pause_writing(self) -> None:
        # more than MAX_WRITE_BUFFER queued: the guest does not read its replies
        if not self.closed:
            self.stats.errors["slow_reader"] += 1
            self.close(abort=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if not self._accepted:
            return
        if exc is not None and not self.closed:  # reset or broken pipe mid-exchange
            self.stats.errors["connection_lost"] += 1
        self.close()
        self.stats.connections_open -= 1
        self.owner.on_gone(self)

    # --- output and teardown -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue encoded frame bytes (nothing once closing)."""
        if not self.closed:
            try:
                self.transport.write(data)  # type: ignore[union-attr]
            except Exception:  # a vanished peer ends in connection_lost
                pass

    def send_frame(self, frame: framing.Frame) -> None:
        if self.closed:
            return
        try:
            data = frame.encode()
        except FramingError as exc:  # a relay bug, not the guest's: count it, say it
            self.stats.errors["unsendable_frame"] += 1
            log.error("cannot send %s frame: %s", FRAME_NAMES[frame.type], exc)
            return
        self.stats.frames_out[FRAME_NAMES[frame.type]] += 1
        with contextlib.suppress(Exception):  # a vanished peer ends in connection_lost
            self.transport.write(data)  # type: ignore[union-attr]

    def send_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        self.send_frame(framing.error(request_id, code, message))

    def close(self, *, abort: bool = False) -> None:
        """Idempotent: the owner drops pending work first, so no reply is written late; queued
        frames get :data:`CLOSE_GRACE_S` to flush unless ``abort``."""
        if self.closed and not abort:
            return
        was_closed, self.closed = self.closed, True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not was_closed and self._accepted:
            self.owner.on_closing(self)
        transport = self.transport
        if transport is None or self._lost:
            return
        if abort:
            transport.abort()
            return
        transport.close()
        if self._grace is None:
            # a guest that stops reading must not keep its fd open through a pending flush
            self._grace = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)

    @property
    def gone(self) -> bool:
        """The transport has reported ``connection_lost``."""
        return self._lost

    # --- idle and HELLO deadlines ------------------------------------------------------

    def _arm_watchdog(self) -> None:
        delay = max(self.deadline_ns - self.clock(), 0) / 1e9
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """One timer per connection, re-armed lazily: reads only move a deadline."""
        self._watchdog = None
        if self.closed:
            return
        if self.clock() >= self.deadline_ns:
            reason = "idle_timeout" if self.hello_done else "hello_timeout"
            self.stats.errors[reason] += 1
            self.close()
        else:
            self._arm_watchdog()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info (peer identity for the guest registry)."""
        return self.transport.get_extra_info(name, default) if self.transport else default
