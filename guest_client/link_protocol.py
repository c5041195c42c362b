"""The guest's side of the relay protocol, sans-IO: bytes and receive stamps in; HELLO, replies,
stream frames and errors out. No sockets, timers or clocks here (the asyncio driver,
``guest_client.relay_link``, owns those), so the whole protocol is tested by feeding bytes
(tests/test_link_protocol.py), the way h11 tests a connection.

State per connection: waiting for the relay's HELLO, then up. Across connections: the request
id sequence (shared by requests and streams, so an ERROR names exactly one of them) and the
ids of streams we closed, whose peer's crossing close is the normal end, not an error.
Per-request and per-stream bookkeeping is an opaque token the driver chooses (a callback,
a timer); events hand it back.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

from timesyncd import framing
from timesyncd.framing import ErrorCode, Frame, FrameDecoder, FrameType, FramingError
from timesyncd.logs import decade
from timesyncd.text import clean_text

log = logging.getLogger("guest_client.relay_link")

_STREAM_FRAMES = (FrameType.STREAM_OPEN, FrameType.STREAM_DATA, FrameType.STREAM_CLOSE,
                  FrameType.ERROR)
#: stream ids remembered after we close them, for the peer's crossing close
_CLOSED_STREAMS_KEPT = 64

R = TypeVar("R")  # the driver's token per request
S = TypeVar("S")  # the driver's token per stream


@dataclass(frozen=True, slots=True)
class Upstream:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class RelayReply:
    packet: bytes
    residence_in_ns: int
    residence_out_ns: int
    rx_ns: int  # receive stamp, taken when the bytes arrived


@dataclass(frozen=True, slots=True)
class RelayFailure:
    reason: str  # "timeout", "connection_lost", "relay_<error code>", ...
    detail: str = ""


class RelayProtocolError(Exception):
    """The relay broke the protocol (or refused us); the connection is over. ``reason`` is a
    stable counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Refused:
    """A request that could not be sent: ``counter`` counted, ``reason`` for the caller."""

    counter: str
    reason: str


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloAccepted:
    upstreams: list[Upstream]
    info: dict[str, object]  # the relay's whole HELLO object (e.g. its ``nts_ke`` list)


@dataclass(frozen=True, slots=True)
class RequestDone(Generic[R]):
    request_id: int
    token: R
    result: RelayReply | RelayFailure


@dataclass(frozen=True, slots=True)
class StreamFrame(Generic[S]):
    """A STREAM_*/ERROR frame for an open stream; ``ended`` when it closes the stream."""

    stream_id: int
    token: S
    frame: Frame
    ended: bool


Event = HelloAccepted | RequestDone[R] | StreamFrame[S]


def error_reason(code: int) -> str:
    try:
        return "relay_" + ErrorCode(code).name.lower()
    except ValueError:
        return "relay_error"


class LinkProtocol(Generic[R, S]):
    """One guest's protocol state machine; ``counters`` accumulate over connections."""

    def __init__(self, guest_name: str, *, request_timeout_s: float | None = None,
                 max_pending: int = 1024, address: str = "") -> None:
        self.guest_name = guest_name
        self.request_timeout_s = request_timeout_s
        self.max_pending = max_pending
        self.address = address  # for log lines only
        self.counters: Counter[str] = Counter()
        self.up = False
        self._hello_pending = False
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._pending: dict[int, R] = {}
        self._streams: dict[int, S] = {}
        #: streams we closed whose peer may still be closing too (the relay's close crossing
        #: ours, e.g. an ntpsec KE server that closes first): their late frames are expected
        self._closed_streams: dict[int, None] = {}

    # --- connection ----------------------------------------------------------------------

    def connection_made(self) -> bytes:
        """A new connection: the bytes of our HELLO, to be written first. Our deadline goes
        with it so the relay drops requests still queued past it (``stale``)."""
        self._decoder = FrameDecoder()
        self.up = False
        self._hello_pending = True
        return framing.guest_hello(self.guest_name, self.request_timeout_s).encode()

    def connection_lost(self, reason: str, *, counted: bool = True) -> list[Event[R, S]]:
        """The connection is gone: every request fails ``connection_lost`` (counted as
        ``lost_in_flight`` unless ``counted`` is False, a stop) and every stream gets a
        STREAM_CLOSE ``connection_lost``."""
        self.up = False
        self._hello_pending = False
        pending, self._pending = self._pending, {}
        if pending and counted:
            self.counters["lost_in_flight"] += len(pending)
        events: list[Event[R, S]] = [
            RequestDone(rid, tok, RelayFailure("connection_lost", reason))
            for rid, tok in pending.items()]
        streams, self._streams = self._streams, {}
        events += [StreamFrame(sid, tok, framing.stream_close(sid, "connection_lost"), True)
                   for sid, tok in streams.items()]
        return events

    def receive_data(self, data: bytes, rx_ns: int) -> list[Event[R, S]]:
        """Bytes from the relay, stamped ``rx_ns`` on arrival: a frame gets the stamp of the
        bytes that completed it. Raises ``RelayProtocolError`` (or ``FramingError``) when
        the connection must end; ``data`` empty means the relay closed it."""
        if not data:
            if self._hello_pending:
                raise RelayProtocolError("closed", "connection closed before HELLO")
            return []
        events: list[Event[R, S]] = []
        frames = self._decoder.feed(data)
        for i, frame in enumerate(frames):
            if self._hello_pending:
                events.append(self._on_hello(frame))
                if i + 1 < len(frames):  # nothing was asked yet: nothing can be an answer
                    self.counters["unsolicited_frame"] += len(frames) - i - 1
                break
            event = self._dispatch(frame, rx_ns)
            if event is not None:
                events.append(event)
        return events

    def _on_hello(self, frame: Frame) -> HelloAccepted:
        if frame.type == FrameType.ERROR:
            code, message = framing.parse_error(frame)
            raise RelayProtocolError(error_reason(code), clean_text(message))
        if frame.type != FrameType.HELLO:
            raise RelayProtocolError("unexpected_frame", f"type {frame.type} before HELLO")
        hello = framing.parse_relay_hello(frame)
        self._hello_pending = False
        self.up = True
        return HelloAccepted([Upstream(i, n) for i, n in hello.upstreams], hello.info)

    # --- requests and streams ------------------------------------------------------------

    def new_request_id(self) -> int:
        """Next id, shared by requests and streams so an ERROR names exactly one of them."""
        rid = self._next_id
        self._next_id = rid % 0xFFFF_FFFF + 1  # 1..2^32-1; 0 is the HELLO's
        return rid

    def prepare_request(self, upstream: int, packet: bytes) -> tuple[int, bytes] | Refused:
        """An id and the bytes of one NTP request; :meth:`track` it once written."""
        if not self.up:
            return self.refuse("send_not_connected", "relay_not_connected")
        if len(self._pending) >= self.max_pending:
            return self.refuse("send_busy", "send_busy")
        rid = self.new_request_id()
        try:
            return rid, framing.ntp_request(rid, upstream, packet).encode()
        except FramingError:
            return self.refuse("send_oversized", "send_oversized")

    def refuse(self, counter: str, reason: str) -> Refused:
        self.counters[counter] += 1
        return Refused(counter, reason)

    def track(self, rid: int, token: R) -> None:
        self._pending[rid] = token

    def forget(self, rid: int) -> R | None:
        """Stop waiting for ``rid`` (cancelled): its reply, if any, counts as unsolicited."""
        return self._pending.pop(rid, None)

    def expire(self, rid: int) -> RequestDone[R] | None:
        """``rid``'s deadline passed: a ``timeout`` failure, or None if it already ended."""
        token = self._pending.pop(rid, None)
        if token is None:
            return None
        self.counters["timeout"] += 1
        return RequestDone(rid, token, RelayFailure(
            "timeout", f"no reply in {self.request_timeout_s} s"))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def open_stream(self, token: S) -> int | None:
        """Register a stream id whose frames come back as :class:`StreamFrame`; None if down.
        The caller sends STREAM_OPEN itself."""
        if not self.up:
            self.counters["send_not_connected"] += 1
            return None
        sid = self.new_request_id()
        self._streams[sid] = token
        return sid

    def close_stream(self, sid: int, reason: str = "") -> bytes | None:
        """Forget a stream: the STREAM_CLOSE to send, None if the relay already ended it."""
        if self._streams.pop(sid, None) is None:
            return None
        self._closed_streams[sid] = None
        while len(self._closed_streams) > _CLOSED_STREAMS_KEPT:
            del self._closed_streams[next(iter(self._closed_streams))]
        return framing.stream_close(sid, reason).encode()

    def _dispatch(self, frame: Frame, rx_ns: int) -> Event[R, S] | None:
        rid = frame.request_id
        if rid in self._streams and frame.type in _STREAM_FRAMES:
            ended = frame.type in (FrameType.STREAM_CLOSE, FrameType.ERROR)
            token = self._streams.pop(rid) if ended else self._streams[rid]
            return StreamFrame(rid, token, frame, ended)
        if rid in self._closed_streams and frame.type in _STREAM_FRAMES:
            # the relay's close (or last bytes) crossing ours: the normal end, not an error
            if frame.type != FrameType.STREAM_DATA:
                del self._closed_streams[rid]
            return None
        if frame.type == FrameType.NTP_REPLY:
            request = self._pending.pop(rid, None)
            if request is None:
                self.counters["unsolicited_reply"] += 1
                return None
            try:
                packet, r_in, r_out = framing.parse_ntp_reply(frame)
            except FramingError as exc:
                self.counters[f"reply_{exc.reason}"] += 1
                return RequestDone(rid, request,
                                   RelayFailure(f"malformed_reply:{exc.reason}", str(exc)))
            return RequestDone(rid, request, RelayReply(packet, r_in, r_out, rx_ns))
        if frame.type == FrameType.ERROR:
            return self._on_error(frame)
        self.counters[f"ignored_frame_{frame.type}"] += 1
        return None

    def _on_error(self, frame: Frame) -> Event[R, S] | None:
        try:
            code, message = framing.parse_error(frame)
        except FramingError as exc:
            self.counters[f"error_{exc.reason}"] += 1
            return None
        reason = error_reason(code)
        self.counters[reason] += 1
        message = clean_text(message)
        token = self._pending.pop(frame.request_id, None)
        if token is None:
            self.counters["error_unknown_id"] += 1
            count = self.counters["error_unknown_id"]
            if decade(count):
                log.warning("relay %s sent an ERROR for request %d we are not waiting for "
                            "(%d so far): %s %s", self.address, frame.request_id, count,
                            reason, message)
            return None
        return RequestDone(frame.request_id, token, RelayFailure(reason, message))
