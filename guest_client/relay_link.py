"""The guest's connection to the host relay: HELLO, framed requests, reconnect with backoff.

One stream carries every upstream's requests; request ids match replies to callers. The
link never interprets NTP: it hands packets, residence times and the receive stamp to
whoever asked. Receive stamps are taken from the disciplined clock when the transport hands
the bytes to the stream (``data_received``), not when the reading task wakes up: that is one
event-loop iteration later, and everything the loop runs in between would otherwise be
counted as return-path delay and bias every offset (measured: +10..+25 us on loopback).

Relay text (ERROR messages, upstream names) is the host's: cleaned (``clean_text``) before
logs or status; ERRORs for unknown ids are counted and logged on the 1st/10th/100th... only.

A relay that stops reading must not grow the guest's memory: once more than
:data:`MAX_WRITE_BUFFER` bytes wait unsent, sends are refused (``send_busy``) and the link is
dropped and reconnected (``relay_stalled``). A relay that answers HELLO and then drops us at
once gets the same reconnect backoff as one that refuses connections: the backoff only resets
after a session stayed up :data:`STABLE_SESSION_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from timesyncd import framing
from timesyncd.framing import ErrorCode, Frame, FrameDecoder, FrameType, FramingError
from timesyncd.logs import decade
from timesyncd.text import clean_text
from timesyncd.transport import TransportError, open_stream

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
READ_CHUNK = 65536
#: Unsent bytes the guest queues for the relay before calling it stalled (as the relay's own
#: ``host_relay.connection.MAX_WRITE_BUFFER`` does for guests that stop reading).
MAX_WRITE_BUFFER = 256 * 1024
#: A session must stay up this long (seconds) before the reconnect backoff starts over; a
#: relay that answers HELLO and closes at once must not be hammered at reconnect_min_s.
STABLE_SESSION_S = 10.0
_STREAM_FRAMES = (FrameType.STREAM_OPEN, FrameType.STREAM_DATA, FrameType.STREAM_CLOSE,
                  FrameType.ERROR)
#: stream ids remembered after we close them, for the peer's crossing close
_CLOSED_STREAMS_KEPT = 64


@dataclass(frozen=True, slots=True)
class Upstream:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class RelayReply:
    packet: bytes
    residence_in_ns: int
    residence_out_ns: int
    rx_ns: int  # receive stamp from ``rx_clock``


@dataclass(frozen=True, slots=True)
class RelayFailure:
    reason: str  # "timeout", "connection_lost", "relay_<error code>", ...
    detail: str = ""


ReplyCallback = Callable[[RelayReply | RelayFailure], None]
Connector = Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class RxStamps:
    """Arrival stamps of the chunks a transport feeds into a ``StreamReader``.

    ``StreamReaderProtocol.data_received`` calls ``reader.feed_data``; wrapping that bound
    method (on this one reader) stamps each chunk as it arrives, before the reading task is
    even scheduled. :meth:`split` then cuts what ``read`` returned back into those chunks, so
    a frame gets the stamp of the chunk that completed it. Memory is bounded by the reader's
    own buffer (the transport pauses when it is full). Readers without ``feed_data`` (test
    doubles) get the stamp at read time.
    """

    def __init__(self, reader: asyncio.StreamReader, clock: Callable[[], int]) -> None:
        self._clock = clock
        self._chunks: deque[list[int]] = deque()  # [bytes not yet read, rx stamp]
        feed = getattr(reader, "feed_data", None)
        if feed is None:
            return

        def stamped_feed(data: bytes) -> None:
            if data:
                self._chunks.append([len(data), clock()])
            feed(data)

        reader.feed_data = stamped_feed  # type: ignore[method-assign,assignment]

    def split(self, data: bytes) -> list[tuple[bytes, int]]:
        """``data`` (the next bytes read) as ``(piece, arrival stamp)`` in order."""
        out: list[tuple[bytes, int]] = []
        pos = 0
        while pos < len(data):
            if not self._chunks:  # fed before stamping began, or an unhooked reader
                out.append((data[pos:], self._clock()))
                break
            chunk = self._chunks[0]
            take = min(chunk[0], len(data) - pos)
            out.append((data[pos:pos + take], chunk[1]))
            pos += take
            chunk[0] -= take
            if chunk[0] == 0:
                self._chunks.popleft()
        return out


class RelayProtocolError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _error_reason(code: int) -> str:
    try:
        return "relay_" + ErrorCode(code).name.lower()
    except ValueError:
        return "relay_error"


@dataclass
class _Pending:
    callback: ReplyCallback
    timer: asyncio.TimerHandle


class RelayLink:
    """Keeps one connection to ``address`` up; ``send`` requests over it.

    ``on_up(upstreams)`` runs after each successful HELLO, ``on_down(reason)`` when an
    established connection is lost. Outstanding requests then fail with ``connection_lost``
    (counted as ``lost_in_flight``). A refused :meth:`send` leaves its reason, as a caller
    should report it, in :attr:`last_refusal`.
    """

    def __init__(
        self, address: str, guest_name: str, *, rx_clock: Callable[[], int],
        on_up: Callable[[list[Upstream]], None], on_down: Callable[[str], None],
        reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
        request_timeout_s: float = 5.0, max_pending: int = 1024,
        rng: random.Random | None = None, connect: Connector | None = None,
        max_write_buffer: int = MAX_WRITE_BUFFER, stable_session_s: float = STABLE_SESSION_S,
    ) -> None:
        self.address = address
        self.guest_name = guest_name
        self._rx_clock = rx_clock
        self._on_up = on_up
        self._on_down = on_down
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.request_timeout_s = request_timeout_s
        self.max_pending = max_pending
        self.max_write_buffer = max_write_buffer
        self.stable_session_s = stable_session_s
        self._rng = rng or random.Random()
        self._connect = connect or (lambda a: open_stream(a, timeout_s=request_timeout_s))
        self._writer: asyncio.StreamWriter | None = None
        #: set when we gave up on the current connection (stalled relay); its session ends soon
        self._drop_reason: str | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._task: asyncio.Task[None] | None = None
        self.upstreams: list[Upstream] = []
        #: the relay's whole HELLO object (e.g. its ``nts_ke`` endpoint list)
        self.hello_info: dict[str, object] = {}
        #: open byte streams (NTS-KE): stream id -> handler of STREAM_*/ERROR frames for it
        self._streams: dict[int, Callable[[Frame], None]] = {}
        #: streams we closed whose peer may still be closing too (the relay's close crossing
        #: ours, e.g. an ntpsec KE server that closes first): their late frames are expected
        self._closed_streams: dict[int, None] = {}
        self.counters: Counter[str] = Counter()
        self.connects = 0
        #: the latest problem, for status; cleared by each successful HELLO
        self.last_error = ""
        #: the latest warning logged: a relay failing the same way again stays quiet until a
        #: session has been stable (``last_error`` is cleared on every HELLO, so cannot serve)
        self._last_logged = ""
        #: why the latest refused :meth:`send` was refused, as the caller should report it
        self.last_refusal = ""

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._drop_reason is None

    async def start(self, on_crash: Callable[[Exception], None] | None = None) -> None:
        """Run the link in a task; ``on_crash`` gets an exception that escaped it (a bug: the
        link would otherwise stop reconnecting in silence while the daemon looks alive)."""
        self._task = asyncio.create_task(self._run(), name=f"relay-link {self.address}")
        if on_crash is not None:
            def done(task: asyncio.Task[None]) -> None:
                if not task.cancelled() and isinstance(task.exception(), Exception):
                    log.error("relay link task failed", exc_info=task.exception())
                    on_crash(task.exception())  # type: ignore[arg-type]
            self._task.add_done_callback(done)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_task(self._task)
            self._task = None
        self._close("stopped", notify=False)

    def send(self, upstream: int, packet: bytes, callback: ReplyCallback) -> int | None:
        """Frame and write one NTP request; ``None`` if not possible, the reason counted and
        left in :attr:`last_refusal` (``relay_not_connected``, ``send_busy``,
        ``send_oversized``)."""
        writer = self._writer
        if writer is None or not self.connected:
            self._refuse("send_not_connected", "relay_not_connected")
            return None
        if len(self._pending) >= self.max_pending:
            self._refuse("send_busy", "send_busy")
            return None
        rid = self.new_request_id()
        try:
            data = framing.ntp_request(rid, upstream, packet).encode()
        except FramingError:
            self._refuse("send_oversized", "send_oversized")
            return None
        if not self._room_for(len(data)):
            self._refuse("send_busy", "send_busy")
            return None
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.request_timeout_s, self._expire, rid)
        self._pending[rid] = _Pending(callback, timer)
        writer.write(data)
        return rid

    def _refuse(self, counter: str, reason: str) -> None:
        self.counters[counter] += 1
        self.last_refusal = reason

    def _room_for(self, size: int) -> bool:
        """False, and the link dropped, once the relay lets too much pile up unsent: a relay
        that stopped reading would otherwise grow our memory without limit while every
        request times out and the link still looks connected."""
        assert self._writer is not None
        transport = self._writer.transport
        queued = transport.get_write_buffer_size()
        if queued + size <= self.max_write_buffer:
            return True
        if self._drop_reason is None:
            self.counters["relay_stalled"] += 1
            # no byte count in it: the same stall again must repeat the message (logged once)
            self._drop_reason = (f"relay stalled: over {self.max_write_buffer} bytes unsent, "
                                 "it stopped reading")
            transport.abort()  # close() would wait for the buffer to drain: never, here
        return False

    def reset(self, reason: str) -> None:
        """Drop the connection now and reconnect (a restore or clone: the old session's state
        is shared with every copy of the guest)."""
        if self._writer is not None and self._drop_reason is None:
            self.counters["reset"] += 1
            self._drop_reason = reason
            self._writer.transport.abort()

    def new_request_id(self) -> int:
        """Next id, shared by requests and streams so an ERROR names exactly one of them."""
        rid = self._next_id
        self._next_id = rid % 0xFFFF_FFFF + 1  # 1..2^32-1; 0 is the HELLO's
        return rid

    def open_stream(self, handler: Callable[[Frame], None]) -> int | None:
        """Register a stream id whose STREAM_*/ERROR frames go to ``handler``; None if down.

        When the connection drops, ``handler`` gets a STREAM_CLOSE with reason
        ``connection_lost``. The caller sends STREAM_OPEN itself (:meth:`send_frame`).
        """
        if not self.connected:
            self.counters["send_not_connected"] += 1
            return None
        sid = self.new_request_id()
        self._streams[sid] = handler
        return sid

    def close_stream(self, sid: int, reason: str = "") -> None:
        """Forget a stream, telling the relay unless it already ended it."""
        if self._streams.pop(sid, None) is not None:
            self._closed_streams[sid] = None
            while len(self._closed_streams) > _CLOSED_STREAMS_KEPT:
                del self._closed_streams[next(iter(self._closed_streams))]
            self.send_frame(framing.stream_close(sid, reason))

    def send_frame(self, frame: Frame) -> bool:
        """Write one frame as is (streams, health); False when not connected or stalled."""
        writer = self._writer
        if writer is None or not self.connected:
            return False
        data = frame.encode()
        if not self._room_for(len(data)):
            self.counters["send_busy"] += 1
            return False
        writer.write(data)
        return True

    def cancel(self, rid: int) -> None:
        """Forget a request (its reply, if any, is then counted as unsolicited)."""
        p = self._pending.pop(rid, None)
        if p is not None:
            p.timer.cancel()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- connection loop ---------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = min(self.reconnect_max_s, self.reconnect_min_s * 2.0 ** min(attempt, 30))
        return base * self._rng.uniform(0.5, 1.0)

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                reader, writer = await self._connect(self.address)
            except (TransportError, OSError) as exc:
                reason = getattr(exc, "reason", "os_error")
                self.counters[f"connect_{reason}"] += 1
                self._note_error(f"connect to relay {self.address} failed: {exc}")
            else:
                try:
                    uptime = await self._session(reader, writer)
                finally:
                    writer.close()
                if uptime is not None and uptime >= self.stable_session_s:
                    attempt = 0  # a flapping relay (HELLO, then gone) keeps backing off
            delay = self._backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> float | None:
        """Run one connection; how long it was up after HELLO (s), None if it never was."""
        decoder = FrameDecoder()
        stamps = RxStamps(reader, self._rx_clock)  # before anything can arrive
        try:
            hello = {"version": PROTOCOL_VERSION, "name": self.guest_name}
            writer.write(framing.json_frame(FrameType.HELLO, 0, hello).encode())
            async with asyncio.timeout(self.request_timeout_s):  # wait_for may swallow cancel
                upstreams = await self._await_hello(reader, decoder, stamps)
        except TimeoutError:
            self.counters["hello_timeout"] += 1
            self._note_error(f"relay {self.address} did not answer HELLO")
            return None
        except (RelayProtocolError, FramingError) as exc:
            self.counters[f"hello_{exc.reason}"] += 1
            self._note_error(f"relay {self.address} HELLO failed: {exc}")
            return None
        except (ConnectionError, OSError) as exc:
            self.counters["hello_connection_lost"] += 1
            self._note_error(f"relay {self.address} closed during HELLO: {exc}")
            return None
        self.upstreams = upstreams
        self._writer = writer
        self._drop_reason = None
        self.connects += 1
        self.last_error = ""
        loop = asyncio.get_running_loop()
        up_since = loop.time()
        log.info("connected to relay %s; upstreams: %s", self.address,
                 ", ".join(u.name for u in upstreams) or "none")
        self._on_up(upstreams)
        reason = "closed by relay"
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                for piece, rx_ns in stamps.split(data):
                    for frame in decoder.feed(piece):
                        self._dispatch(frame, rx_ns)
        except FramingError as exc:
            self.counters[f"framing_{exc.reason}"] += 1
            reason = f"framing error: {exc}"
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        if self._drop_reason is not None:  # we hung up: that is the reason, not the EOF
            reason = self._drop_reason
        uptime = loop.time() - up_since
        if uptime >= self.stable_session_s:
            self._last_logged = ""  # a new episode: its first problem is worth a warning
        self._note_error(f"lost relay {self.address}: {reason}")
        self._close(reason, notify=True)
        return uptime

    async def _await_hello(
        self, reader: asyncio.StreamReader, decoder: FrameDecoder, stamps: RxStamps
    ) -> list[Upstream]:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                raise RelayProtocolError("closed", "connection closed before HELLO")
            stamps.split(data)  # keep the stamp queue in step with the bytes read
            frames = decoder.feed(data)
            for i, frame in enumerate(frames):
                if frame.type == FrameType.ERROR:
                    code, message = framing.parse_error(frame)
                    raise RelayProtocolError(_error_reason(code), clean_text(message))
                if frame.type != FrameType.HELLO:
                    raise RelayProtocolError("unexpected_frame", f"type {frame.type} before HELLO")
                if i + 1 < len(frames):  # nothing was asked yet: nothing can be an answer
                    self.counters["unsolicited_frame"] += len(frames) - i - 1
                upstreams = parse_hello(frame)
                info = framing.parse_json(frame)
                self.hello_info = info if isinstance(info, dict) else {}
                return upstreams

    def _dispatch(self, frame: Frame, rx_ns: int) -> None:
        stream = self._streams.get(frame.request_id)
        if stream is not None and frame.type in _STREAM_FRAMES:
            if frame.type == FrameType.STREAM_CLOSE or frame.type == FrameType.ERROR:
                del self._streams[frame.request_id]
            stream(frame)
            return
        if frame.request_id in self._closed_streams and frame.type in _STREAM_FRAMES:
            # the relay's close (or last bytes) crossing ours: the normal end, not an error
            if frame.type != FrameType.STREAM_DATA:
                del self._closed_streams[frame.request_id]
            return
        if frame.type == FrameType.NTP_REPLY:
            p = self._pending.pop(frame.request_id, None)
            if p is None:
                self.counters["unsolicited_reply"] += 1
                return
            p.timer.cancel()
            try:
                packet, r_in, r_out = framing.parse_ntp_reply(frame)
            except FramingError as exc:
                self.counters[f"reply_{exc.reason}"] += 1
                p.callback(RelayFailure(f"malformed_reply:{exc.reason}", str(exc)))
                return
            p.callback(RelayReply(packet, r_in, r_out, rx_ns))
        elif frame.type == FrameType.ERROR:
            try:
                code, message = framing.parse_error(frame)
            except FramingError as exc:
                self.counters[f"error_{exc.reason}"] += 1
                return
            reason = _error_reason(code)
            self.counters[reason] += 1
            message = clean_text(message)
            p = self._pending.pop(frame.request_id, None)
            if p is None:
                self.counters["error_unknown_id"] += 1
                count = self.counters["error_unknown_id"]
                if decade(count):
                    log.warning("relay %s sent an ERROR for request %d we are not waiting for "
                                "(%d so far): %s %s", self.address, frame.request_id, count,
                                reason, message)
                return
            p.timer.cancel()
            p.callback(RelayFailure(reason, message))
        else:
            self.counters[f"ignored_frame_{frame.type}"] += 1

    def _expire(self, rid: int) -> None:
        p = self._pending.pop(rid, None)
        if p is not None:
            self.counters["timeout"] += 1
            p.callback(RelayFailure("timeout", f"no reply in {self.request_timeout_s} s"))

    def _close(self, reason: str, notify: bool) -> None:
        was_up = self._writer is not None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._drop_reason = None
        pending, self._pending = self._pending, {}
        if pending and notify:  # a real loss, not stop(): else they would vanish from status
            self.counters["lost_in_flight"] += len(pending)
        for p in pending.values():
            p.timer.cancel()
            p.callback(RelayFailure("connection_lost", reason))
        streams, self._streams = self._streams, {}
        for sid, handler in streams.items():
            handler(framing.stream_close(sid, "connection_lost"))
        if was_up and notify:
            self._on_down(reason)

    def _note_error(self, message: str) -> None:
        """Record ``message``; warn unless it repeats the last warning (a relay failing the
        same way on every reconnect logs once per episode, not once per attempt)."""
        if message != self._last_logged:
            log.warning("%s", message)
        else:
            log.debug("%s", message)
        self._last_logged = message
        self.last_error = message


async def cancel_task(task: asyncio.Task[None], tries: int = 5) -> None:
    """Cancel ``task`` and wait for it, re-cancelling should one cancel be swallowed."""
    for _ in range(tries):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()


def parse_hello(frame: Frame) -> list[Upstream]:
    """The relay's upstream list; a malformed HELLO is a protocol error, not a crash."""
    obj = framing.parse_json(frame)
    if not isinstance(obj, dict) or obj.get("version") != PROTOCOL_VERSION:
        raise RelayProtocolError("bad_hello", f"unsupported HELLO {clean_text(str(obj), 100)}")
    raw = obj.get("upstreams")
    if not isinstance(raw, list):
        raise RelayProtocolError("bad_hello", "HELLO without an upstream list")
    upstreams = []
    for item in raw:
        if not (isinstance(item, dict) and isinstance(item.get("index"), int)
                and isinstance(item.get("name"), str) and 0 <= item["index"] <= 255):
            raise RelayProtocolError("bad_hello",
                                     f"bad upstream entry {clean_text(str(item), 100)}")
        # the name becomes part of a source name: in status, logs and metric labels
        upstreams.append(Upstream(item["index"], clean_text(item["name"], 128)))
    return upstreams
