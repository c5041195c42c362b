"""NTS-KE pass-through: guest byte streams to allowlisted NTS-KE servers, bytes only.

The guest runs TLS end to end with the NTS-KE server; the relay connects a TCP stream to
the allowlisted endpoint the guest names by index and moves opaque bytes both ways. It never
sees keys or cookies, so it cannot forge NTS-protected time: it can only delay or drop.
Each stream is bounded (bytes each way, lifetime) and a guest connection holds few of them,
so a guest cannot use the relay as a general-purpose TCP proxy or exhaust its fds.

Each TLS handshake costs the KE server, a third party, real work, and it sees the host's
address: so stream opens also draw on a per-guest budget (a few a minute, across all of a
guest's connections: by vsock CID, TCP host or ``fc:`` socket; per connection where the
peer cannot be told apart). Refusals are counted (``guest_budget_exceeded``) on /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from host_relay.reach import Reach
from timesyncd import framing
from timesyncd.addresses import Address
from timesyncd.framing import ErrorCode, Frame, StreamKind
from timesyncd.logs import decade
from timesyncd.ratelimit import TokenBucket
from timesyncd.transport import TransportError, open_stream

log = logging.getLogger(__name__)

_READ_CHUNK = framing.MAX_PAYLOAD
#: Data a guest may send before the endpoint accepted the connection (a ClientHello fits).
_EARLY_DATA_LIMIT = 64 * 1024

SendFrame = Callable[[Frame], None]


@dataclass(frozen=True)
class KeProxyLimits:
    connect_timeout_s: float = 5.0
    stream_timeout_s: float = 15.0  # whole lifetime of one stream
    max_streams: int = 2  # per guest connection
    max_stream_bytes: int = 256 * 1024  # each direction
    per_guest_per_minute: float = 6.0  # stream opens, across all of a guest's connections
    per_guest_burst: int = 8


@dataclass(eq=False)
class _Stream:
    owner: object
    stream_id: int
    endpoint: Address
    send: SendFrame
    task: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None
    early: bytearray = field(default_factory=bytearray)
    bytes_in: int = 0  # guest -> endpoint
    bytes_out: int = 0  # endpoint -> guest
    closed: bool = False


class KeProxy:
    """Streams per guest connection (``owner``); frames to the guest go through ``send``."""

    def __init__(self, endpoints: Sequence[Address], limits: KeProxyLimits | None = None) -> None:
        self.endpoints = tuple(endpoints)
        self.limits = limits or KeProxyLimits()
        self._streams: dict[tuple[int, int], _Stream] = {}
        #: streams whose end we told the guest: its close (or last bytes) may cross ours
        self._told_closed: dict[tuple[int, int], None] = {}
        self._by_owner: dict[int, set[_Stream]] = {}
        self.counters: Counter[str] = Counter()
        self._failing: Counter[str] = Counter()  # connect failures in a row, per endpoint
        #: per endpoint: each connect is a poll (chrony-like reach register)
        self.reach: dict[str, Reach] = {str(a): Reach() for a in self.endpoints}
        self._budgets: dict[object, TokenBucket] = {}  # guest -> its stream-open budget

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # --- frames from the guest ---------------------------------------------------------------

    def on_frame(self, owner: object, frame: Frame, send: SendFrame) -> None:
        """Handle a STREAM_* frame from ``owner``; raises FramingError for a malformed one."""
        key = (id(owner), frame.request_id)
        if frame.type == framing.FrameType.STREAM_OPEN:
            self._open(owner, frame, send)
            return
        stream = self._streams.get(key)
        if stream is None and key in self._told_closed:
            # the guest's close (or TLS close_notify) crossing ours, as when the KE server
            # closes first (ntpsec does): the normal end of a stream, not an error
            if frame.type == framing.FrameType.STREAM_CLOSE:
                del self._told_closed[key]
            return
        if stream is None:
            # a guest bug: answer data, ignore a close
            self.counters["unknown_stream"] += 1
            if frame.type == framing.FrameType.STREAM_DATA:
                send(framing.stream_close(frame.request_id, "no such stream"))
            return
        if frame.type == framing.FrameType.STREAM_CLOSE:
            self.counters["closed_by_guest"] += 1
            self._finish(stream, None)
        else:
            self._from_guest(stream, frame.payload)

    def close_owner(self, owner: object) -> None:
        """The guest connection went away: drop all its streams at once."""
        for stream in list(self._by_owner.get(id(owner), ())):
            self.counters["guest_disconnected"] += 1
            self._finish(stream, None)

    async def stop(self) -> None:
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        for stream in list(self._streams.values()):
            self._finish(stream, None)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    # --- internals ---------------------------------------------------------------------------

    def _open(self, owner: object, frame: Frame, send: SendFrame) -> None:
        sid = frame.request_id
        kind, index = framing.parse_stream_open(frame)
        if kind != StreamKind.NTS_KE or index >= len(self.endpoints):
            self.counters["unknown_endpoint"] += 1
            send(framing.error(sid, ErrorCode.UNKNOWN_ENDPOINT,
                               f"no NTS-KE endpoint {index} (kind {kind})"))
            return
        if not self._within_budget(owner):
            self.counters["guest_budget_exceeded"] += 1
            send(framing.error(sid, ErrorCode.RATE_LIMITED,
                               f"NTS-KE budget: {self.limits.per_guest_per_minute:g} streams a "
                               "minute per guest"))
            return
        key = (id(owner), sid)
        owned = self._by_owner.setdefault(id(owner), set())
        if key in self._streams or len(owned) >= self.limits.max_streams:
            self.counters["too_many_streams"] += 1
            send(framing.error(sid, ErrorCode.BUSY, "stream id in use or too many streams"))
            return
        stream = _Stream(owner, sid, self.endpoints[index], send)
        self._streams[key] = stream
        owned.add(stream)
        self.counters["opened"] += 1
        stream.task = asyncio.create_task(self._run(stream), name=f"ke-stream {sid}")

    def _within_budget(self, owner: object, now_ns: int | None = None) -> bool:
        """Spend one stream open of ``owner``'s guest (its ``peer_key``, else the connection)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        guest = getattr(owner, "peer_key", None) or id(owner)
        bucket = self._budgets.get(guest)
        if bucket is None:
            if len(self._budgets) >= 4096:  # bounded: forget buckets that have refilled
                full_after = self.limits.per_guest_burst / self.limits.per_guest_per_minute * 60e9
                for old in [g for g, b in self._budgets.items() if now - b.last_ns > full_after]:
                    del self._budgets[old]
            bucket = TokenBucket(self.limits.per_guest_per_minute / 60.0,
                                 self.limits.per_guest_burst, now)
            self._budgets[guest] = bucket
        return bucket.take(now)

    def _from_guest(self, stream: _Stream, data: bytes) -> None:
        stream.bytes_in += len(data)
        if stream.bytes_in > self.limits.max_stream_bytes:
            self.counters["stream_too_long"] += 1
            self._finish(stream, "stream byte limit exceeded")
            return
        if stream.writer is None:
            if len(stream.early) + len(data) > _EARLY_DATA_LIMIT:
                self.counters["stream_too_long"] += 1
                self._finish(stream, "too much data before the endpoint connected")
                return
            stream.early += data
            return
        with contextlib.suppress(Exception):  # the reader side notices a dead endpoint
            stream.writer.write(data)

    async def _run(self, stream: _Stream) -> None:
        reason: str | None = "endpoint closed"
        try:
            async with asyncio.timeout(self.limits.stream_timeout_s):
                try:
                    reader, writer = await open_stream(
                        stream.endpoint, timeout_s=self.limits.connect_timeout_s)
                except (TransportError, OSError) as exc:
                    self.counters["connect_failed"] += 1
                    name = str(stream.endpoint)
                    self._reach_poll(name, False)
                    self._failing[name] += 1
                    if decade(self._failing[name]):
                        log.warning("NTS-KE endpoint %s: %s (%d failed connects in a row)",
                                    name, exc, self._failing[name],
                                    extra={"event": "nts_ke_connect_failed", "endpoint": name})
                    if not stream.closed:
                        stream.send(framing.error(stream.stream_id, ErrorCode.STREAM_FAILED,
                                                  f"cannot connect to {stream.endpoint}"))
                    reason = None
                    return
                stream.writer = writer
                self._failing.pop(str(stream.endpoint), None)  # reachable again
                self._reach_poll(str(stream.endpoint), True)
                if stream.closed:  # the guest gave up while we connected
                    writer.close()
                    return
                stream.send(framing.stream_opened(stream.stream_id))
                if stream.early:
                    writer.write(bytes(stream.early))
                    stream.early.clear()
                while not stream.closed:
                    data = await reader.read(_READ_CHUNK)
                    if not data:
                        reason = ""  # clean end: the server finished its response
                        break
                    stream.bytes_out += len(data)
                    if stream.bytes_out > self.limits.max_stream_bytes:
                        self.counters["stream_too_long"] += 1
                        reason = "stream byte limit exceeded"
                        break
                    for f in framing.stream_data(stream.stream_id, data):
                        stream.send(f)
        except TimeoutError:
            self.counters["stream_timeout"] += 1
            reason = "stream lifetime exceeded"
        except (ConnectionError, OSError) as exc:
            self.counters["endpoint_error"] += 1
            reason = f"endpoint error: {exc}"
        finally:
            self._finish(stream, reason)

    def _reach_poll(self, name: str, ok: bool) -> None:
        change = self.reach[name].poll(ok, time.monotonic_ns())
        if change is not None:
            log.warning("NTS-KE endpoint %s is %s", name,
                        "reachable again" if change == "reachable" else "unreachable",
                        extra={"event": f"nts_ke_{change}", "endpoint": name})

    def _finish(self, stream: _Stream, reason: str | None) -> None:
        """Idempotent; ``reason`` None: do not tell the guest (it closed, or got an ERROR)."""
        if stream.closed:
            return
        stream.closed = True
        self._streams.pop((id(stream.owner), stream.stream_id), None)
        owned = self._by_owner.get(id(stream.owner))
        if owned is not None:
            owned.discard(stream)
            if not owned:
                del self._by_owner[id(stream.owner)]
        if reason is not None:
            key = (id(stream.owner), stream.stream_id)
            self._told_closed[key] = None
            while len(self._told_closed) > self.limits.max_streams * 4 + 64:
                del self._told_closed[next(iter(self._told_closed))]
            stream.send(framing.stream_close(stream.stream_id, reason))
        if stream.writer is not None:
            stream.writer.close()
        current = asyncio.current_task()
        if stream.task is not None and stream.task is not current:
            stream.task.cancel()
