"""The relay service: accept guest streams, forward framed NTP to allowlisted upstreams.

Per connection: HELLO first (answered with the upstream list), then NTP_REQUEST frames, each
forwarded unchanged to the upstream chosen by index and answered with NTP_REPLY carrying the
relay's own residence time per direction, or with ERROR. Everything a guest can get wrong is
counted under a stable reason; none of it raises out of the service or leaks an fd or a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from host_relay import local_source
from host_relay.guest_registry import GuestRegistry
from host_relay.ke_proxy import KeProxy, KeProxyLimits
from host_relay.local_source import LocalSource
from host_relay.metrics import RelayCollector, RelayMetrics, make_registry, render, status_document
from host_relay.metrics_http import MetricsServer
from host_relay.settings import RelaySettings
from host_relay.stats import RelayStats
from host_relay.upstream import Pending, Upstream, UpstreamError
from timesyncd import framing
from timesyncd.addresses import Address, parse_address
from timesyncd.framing import ErrorCode, FrameDecoder, FrameType, FramingError
from timesyncd.health import HealthError
from timesyncd.packet import HEADER_LEN, MAX_PACKET_LEN, Mode, PacketError
from timesyncd.transport import StreamListener, listen_stream

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
#: A guest that stops reading its replies is dropped once this much is queued for it.
_MAX_WRITE_BUFFER = 256 * 1024
#: How long a closing connection may take to flush its last frames before it is aborted.
_CLOSE_GRACE_S = 1.0
_FRAME_NAMES = {t.value: t.name for t in FrameType}


class _TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "last_ns")

    def __init__(self, rate: float, burst: int, now_ns: int) -> None:
        self.rate = rate / 1e9
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last_ns = now_ns

    def take(self, now_ns: int) -> bool:
        self.tokens = min(self.burst, self.tokens + (now_ns - self.last_ns) * self.rate)
        self.last_ns = now_ns
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Connection:
    """One guest stream: its decoder, limits and in-flight requests."""

    __slots__ = ("writer", "name", "pending", "bucket", "deadline_ns", "watchdog", "closed",
                 "hello_done")

    def __init__(self, writer: asyncio.StreamWriter, bucket: _TokenBucket, deadline_ns: int):
        self.writer = writer
        self.name = ""
        self.pending: dict[Pending, Upstream] = {}
        self.bucket = bucket
        self.deadline_ns = deadline_ns
        self.watchdog: asyncio.TimerHandle | None = None
        self.closed = False
        self.hello_done = False


class RelayService:
    """``await start()`` to listen, ``await stop()`` to close everything; see module doc."""

    def __init__(self, settings: RelaySettings) -> None:
        settings.validate()
        self.settings = settings
        self.stats = RelayStats()
        self._upstreams = [
            Upstream(i, parse_address(spec), self.stats, settings.upstream_timeout_s)
            for i, spec in enumerate(settings.upstreams)
        ]
        self._local = None if self._upstreams else LocalSource(settings.local_stratum)
        names = [u.name for u in self._upstreams] or [local_source.NAME]
        self._ke = KeProxy([parse_address(s) for s in settings.nts_ke_servers],
                           KeProxyLimits(stream_timeout_s=settings.nts_ke_timeout_s))
        hello: dict[str, object] = {
            "version": framing.VERSION,
            "upstreams": [{"index": i, "name": n} for i, n in enumerate(names)]}
        if self._ke.endpoints:
            hello["nts_ke"] = self._ke.hello_entries
        self._hello = framing.json_frame(FrameType.HELLO, 0, hello).payload
        self.guests = GuestRegistry()
        self.metrics = RelayMetrics(names)
        self._collector = RelayCollector(self.stats, self.metrics, self.guests, self._in_flight)
        self.metrics_registry = make_registry(self._collector)
        self._metrics_server: MetricsServer | None = None
        self._listeners: list[StreamListener] = []
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._started = False
        self._idle_ns = int(settings.idle_timeout_s * 1e9)
        self._hello_ns = int(settings.hello_timeout_s * 1e9)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open upstream sockets and listen on every configured address (all or nothing)."""
        if self._started:
            return
        self._started = True
        self._stopped.clear()
        try:
            for upstream in self._upstreams:
                await upstream.open()
            for spec in self.settings.listen:
                self._listeners.append(await listen_stream(
                    spec, self._handle, socket_mode=self.settings.socket_mode_bits,
                ))
            if self.settings.metrics:
                self._metrics_server = MetricsServer(self.settings.metrics, self.render_metrics,
                                                     self.status)
                await self._metrics_server.start()
        except BaseException:
            await self.stop()
            raise
        log.info("relay listening on %s", ", ".join(str(a) for a in self.addresses))

    async def stop(self) -> None:
        """Stop listening, drop every connection and its pending requests, close upstreams."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            await listener.close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        for conn in list(self._connections):
            self._close(conn)
        if self._handlers:
            # closed streams end their handlers; cancel only stragglers (Python 3.11's stream
            # server logs a spurious error for a cancelled handler task)
            _, stragglers = await asyncio.wait(set(self._handlers), timeout=2.0)
            for task in stragglers:
                task.cancel()
            if stragglers:
                await asyncio.wait(stragglers, timeout=1.0)
        await self._ke.stop()
        for upstream in self._upstreams:
            upstream.close()
        self._started = False
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Start if needed and run until :meth:`stop` is called."""
        await self.start()
        await self._stopped.wait()

    @property
    def addresses(self) -> tuple[Address, ...]:
        """Bound listen addresses (a ``tcp:`` port 0 shows the real port)."""
        return tuple(listener.bound for listener in self._listeners)

    @property
    def upstream_names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self._upstreams) or (local_source.NAME,)

    @property
    def pending_requests(self) -> int:
        """Requests in flight to upstreams, over all connections."""
        return sum(u.in_flight for u in self._upstreams)

    @property
    def ke_proxy(self) -> KeProxy:
        """NTS-KE pass-through streams and their counters."""
        return self._ke

    @property
    def metrics_address(self) -> str | None:
        """``HOST:PORT`` serving /metrics and /status, if enabled and started."""
        return self._metrics_server.bound if self._metrics_server is not None else None

    def render_metrics(self) -> bytes:
        """Prometheus text exposition of everything below (what /metrics serves)."""
        return render(self.metrics_registry)

    def status(self) -> dict[str, Any]:
        """Relay counters, upstream figures and every connected guest (what /status serves)."""
        return status_document(self._collector)

    @property
    def handler_tasks(self) -> int:
        return len(self._handlers)

    # --- per connection --------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = self.stats
        if len(self._connections) >= self.settings.max_connections:
            stats.connections_refused += 1
            self._write(writer, framing.error(0, ErrorCode.BUSY, "relay at max_connections"))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        now = time.monotonic_ns()
        conn = _Connection(
            writer, _TokenBucket(self.settings.rate_limit, self.settings.rate_burst, now),
            now + self._hello_ns,
        )
        self._connections.add(conn)
        self._handlers.add(task)
        stats.connections_accepted += 1
        stats.connections_open += 1
        self._arm_watchdog(conn)
        decoder = FrameDecoder()
        max_payload = self.settings.max_frame_bytes - framing.HEADER.size
        try:
            while not conn.closed:
                data = await reader.read(_READ_SIZE)
                rx_ns = time.monotonic_ns()
                if not data:
                    break
                if conn.hello_done:
                    conn.deadline_ns = rx_ns + self._idle_ns
                for frame in decoder.feed(data):
                    if len(frame.payload) > max_payload:
                        raise FramingError("oversized", f"payload {len(frame.payload)} bytes")
                    self._on_frame(conn, frame, rx_ns)
                    if conn.closed:
                        break
        except FramingError as exc:
            stats.errors[exc.reason] += 1
            log.debug("closing %s: %s", conn.name or "guest", exc)
            self._write(writer, framing.error(0, ErrorCode.BAD_FRAME, str(exc)))
        except OSError:  # reset or broken pipe: the guest went away mid-exchange
            stats.errors["connection_lost"] += 1
        finally:
            self._close(conn)
            try:
                # a guest that stops reading must not keep its fd open through a pending flush
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_GRACE_S)
            except (Exception, asyncio.CancelledError):
                writer.transport.abort()
            self._connections.discard(conn)
            self._handlers.discard(task)
            stats.connections_open -= 1
            self._guest_gone(conn)

    def _on_frame(self, conn: _Connection, frame: framing.Frame, rx_ns: int) -> None:
        stats = self.stats
        ftype = frame.type
        stats.frames_in[_FRAME_NAMES[ftype]] += 1
        if not conn.hello_done:
            self._on_hello(conn, frame, rx_ns)
        elif ftype == FrameType.NTP_REQUEST:
            self._on_request(conn, frame, rx_ns)
        elif ftype == FrameType.HEALTH:
            self._on_health(conn, frame, rx_ns)  # observability only: never affects forwarding
        elif ftype in (FrameType.STREAM_OPEN, FrameType.STREAM_DATA, FrameType.STREAM_CLOSE):
            if ftype == FrameType.STREAM_OPEN and not conn.bucket.take(rx_ns):
                self.stats.errors["rate_limited"] += 1
                self._send_error(conn, frame.request_id, ErrorCode.RATE_LIMITED,
                                 "stream open rate limit exceeded")
                return
            self._ke.on_frame(conn, frame, lambda f: self._send(conn, f))
        else:
            stats.errors["unexpected_frame"] += 1
            self._send_error(conn, frame.request_id, ErrorCode.BAD_FRAME,
                             f"{_FRAME_NAMES[ftype]} is not accepted from a guest")

    def _on_hello(self, conn: _Connection, frame: framing.Frame, rx_ns: int) -> None:
        if frame.type != FrameType.HELLO:
            self.stats.errors["no_hello"] += 1
            self._send_error(conn, frame.request_id, ErrorCode.BAD_FRAME, "send HELLO first")
            self._close(conn)
            return
        hello = framing.parse_json(frame)  # FramingError closes the connection
        version = hello.get("version") if isinstance(hello, dict) else None
        if version != framing.VERSION:
            self.stats.errors["bad_hello_version"] += 1
            self._send_error(conn, frame.request_id, ErrorCode.BAD_FRAME,
                             f"unsupported protocol version {version!r}; relay speaks "
                             f"{framing.VERSION}")
            self._close(conn)
            return
        name = hello.get("name")
        conn.name = name[:64] if isinstance(name, str) else ""
        conn.hello_done = True
        conn.deadline_ns = rx_ns + self._idle_ns
        self._send(conn, framing.Frame(FrameType.HELLO, frame.request_id, self._hello))
        record = self.guests.connect(conn, conn.writer, conn.name, rx_ns)
        log.info("guest %s (%r) connected", record.guest, conn.name,
                 extra={"event": "guest_connected", "guest": record.guest,
                        "guest_name": conn.name})

    def _on_request(self, conn: _Connection, frame: framing.Frame, rx_ns: int) -> None:
        rid = frame.request_id
        index, packet = framing.parse_ntp_request(frame)
        if not conn.bucket.take(rx_ns):
            self.stats.errors["rate_limited"] += 1
            self._send_error(conn, rid, ErrorCode.RATE_LIMITED, "request rate limit exceeded")
            return
        if index >= len(self._upstreams) and not (self._local is not None and index == 0):
            self.stats.errors["unknown_upstream"] += 1
            self._send_error(conn, rid, ErrorCode.UNKNOWN_UPSTREAM, f"no upstream {index}")
            return
        if not (HEADER_LEN <= len(packet) <= MAX_PACKET_LEN and len(packet) % 4 == 0
                and packet[0] & 7 == Mode.CLIENT):
            self.stats.errors["bad_packet"] += 1
            self._send_error(conn, rid, ErrorCode.BAD_FRAME, "not an NTP client request")
            return
        if self._local is not None:
            self._answer_locally(conn, rid, packet, rx_ns)
            return
        if len(conn.pending) >= self.settings.max_pending:
            self.stats.errors["busy"] += 1
            self._send_error(conn, rid, ErrorCode.BUSY, "too many requests in flight")
            return
        upstream = self._upstreams[index]
        holder: list[Pending] = []

        def on_result(reply: bytes | None, at_ns: int, reason: str) -> None:
            conn.pending.pop(holder[0], None)
            self.metrics.upstream_result(upstream.name, reason, at_ns - sent_ns)
            if reply is None:
                log.warning("upstream %s: request failed (%s)", upstream.name, reason,
                            extra={"event": "upstream_failure", "upstream": upstream.name,
                                   "reason": reason})
            if conn.closed:
                return
            if reply is None:
                code = ErrorCode.UPSTREAM_TIMEOUT if reason == "timeout" else \
                    ErrorCode.UPSTREAM_ERROR
                self._send_error(conn, rid, code, f"upstream {upstream.name}: {reason}")
                return
            out_ns = time.monotonic_ns()
            self.metrics.observe_residence(sent_ns - rx_ns + out_ns - at_ns)
            self._send(conn, framing.ntp_reply(rid, reply, sent_ns - rx_ns, out_ns - at_ns))

        try:
            pending = upstream.submit(packet, on_result)
        except (UpstreamError, OSError) as exc:
            reason = getattr(exc, "reason", "send_failed")
            self.stats.upstream_errors += 1
            self.stats.errors[reason] += 1
            self.metrics.upstream_error(upstream.name, reason)
            self._send_error(conn, rid, ErrorCode.UPSTREAM_ERROR, str(exc))
            return
        sent_ns = pending.sent_ns
        holder.append(pending)
        self.metrics.upstream_sent(upstream.name)
        conn.pending[pending] = upstream

    def _answer_locally(self, conn: _Connection, rid: int, packet: bytes, rx_ns: int) -> None:
        assert self._local is not None
        start_ns = time.monotonic_ns()
        try:
            reply = self._local.answer(packet)
        except PacketError as exc:
            self.stats.errors["bad_packet"] += 1
            self._send_error(conn, rid, ErrorCode.BAD_FRAME, str(exc))
            return
        done_ns = time.monotonic_ns()
        self.stats.local_replies += 1
        self.metrics.observe_residence(done_ns - rx_ns)
        self._send(conn, framing.ntp_reply(rid, reply, start_ns - rx_ns,
                                           time.monotonic_ns() - done_ns))

    # --- observability ---------------------------------------------------------------

    def _on_health(self, conn: _Connection, frame: framing.Frame, rx_ns: int) -> None:
        """Keep the guest's report for metrics; a bad or too-frequent one is only counted."""
        try:
            self.guests.report(conn, frame.payload, rx_ns)
        except HealthError as exc:
            self.stats.errors[f"health_{exc.reason}"] += 1
            record = self.guests.get(conn)
            log.warning("health report refused: %s", exc,
                        extra={"event": "health_refused", "reason": exc.reason,
                               "guest": record.guest if record else "?"})

    def _guest_gone(self, conn: _Connection) -> None:
        record = self.guests.disconnect(conn)
        if record is not None:
            log.info("guest %s (%r) disconnected", record.guest, record.name,
                     extra={"event": "guest_disconnected", "guest": record.guest,
                            "guest_name": record.name, "reports": record.reports})

    def _in_flight(self, name: str) -> int:
        return sum(u.in_flight for u in self._upstreams if u.name == name)

    # --- output and teardown ---------------------------------------------------------

    def _send(self, conn: _Connection, frame: framing.Frame) -> None:
        if conn.closed:
            return
        self.stats.frames_out[_FRAME_NAMES[frame.type]] += 1
        self._write(conn.writer, frame)
        if conn.writer.transport.get_write_buffer_size() > _MAX_WRITE_BUFFER:
            self.stats.errors["slow_reader"] += 1
            self._close(conn)

    def _send_error(self, conn: _Connection, rid: int, code: ErrorCode, message: str) -> None:
        self._send(conn, framing.error(rid, code, message))

    @staticmethod
    def _write(writer: asyncio.StreamWriter, frame: framing.Frame) -> None:
        with contextlib.suppress(Exception):  # a vanished peer is handled by the reader
            writer.write(frame.encode())

    def _arm_watchdog(self, conn: _Connection) -> None:
        delay = max(conn.deadline_ns - time.monotonic_ns(), 0) / 1e9
        conn.watchdog = asyncio.get_running_loop().call_later(delay, self._check_idle, conn)

    def _check_idle(self, conn: _Connection) -> None:
        """One timer per connection, re-armed lazily: reads only move a deadline."""
        if conn.closed:
            return
        if time.monotonic_ns() >= conn.deadline_ns:
            reason = "idle_timeout" if conn.hello_done else "hello_timeout"
            self.stats.errors[reason] += 1
            self._close(conn)
        else:
            self._arm_watchdog(conn)

    def _close(self, conn: _Connection) -> None:
        """Idempotent: cancel pending upstream work first so no reply is written late."""
        if conn.closed:
            return
        conn.closed = True
        if conn.watchdog is not None:
            conn.watchdog.cancel()
        for pending, upstream in conn.pending.items():
            upstream.cancel(pending)
        conn.pending.clear()
        self._ke.close_owner(conn)
        conn.writer.close()
