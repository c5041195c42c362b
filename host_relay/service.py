"""The relay service: accept guest streams, forward framed NTP to allowlisted upstreams.

Per connection: HELLO first (answered with the upstream list), then NTP_REQUEST frames, each
forwarded unchanged to the upstream chosen by index and answered with NTP_REPLY carrying the
relay's own residence time per direction, or with ERROR. Everything a guest can get wrong is
counted under a stable reason; none of it raises out of the service or leaks an fd or a timer.

Connections are :class:`~host_relay.connection.GuestConnection` protocols that call back into
this service per frame; the NTP request/reply path is kept free of per-request closures,
timers and frame objects (see ``on_ntp_request`` and ``_on_upstream_result``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from host_relay import local_source
from host_relay.connection import (
    FRAME_NAMES,
    REPLY_HEAD,
    ConnectionLimits,
    GuestConnection,
)
from host_relay.descriptors import AcceptWatch, FdBudget, fd_families
from host_relay.guest_registry import GuestRegistry, display_name, peer_of
from host_relay.ke_proxy import KeProxy, KeProxyLimits
from host_relay.local_source import LocalSource
from host_relay.metrics import (
    RelayCollector,
    RelayMetrics,
    UpstreamFigures,
    make_registry,
    render,
    status_document,
)
from host_relay.metrics_http import MAX_CLIENTS, MetricsServer
from host_relay.settings import RelaySettings
from host_relay.stall import StallWatch
from host_relay.stats import RelayStats
from host_relay.upstream import Pending, Upstream, UpstreamError
from timesyncd import framing
from timesyncd.addresses import Address, parse_address
from timesyncd.framing import ErrorCode, FrameType, FramingError
from timesyncd.health import HealthError
from timesyncd.logs import EventGate, decade
from timesyncd.packet import HEADER_LEN, MAX_PACKET_LEN, Mode, PacketError
from timesyncd.transport import StreamListener, listen_protocol

log = logging.getLogger(__name__)

#: How long ``stop`` waits for closed connections to flush before aborting them.
_STOP_FLUSH_S = 2.0
_CLAMP = 0xFFFF_FFFF  # residence fields are u32 ns
_REPLY_TYPE = int(FrameType.NTP_REPLY)
_STREAM_TYPES = frozenset((FrameType.STREAM_OPEN, FrameType.STREAM_DATA, FrameType.STREAM_CLOSE))


class RelayService:
    """``await start()`` to listen, ``await stop()`` to close everything; see module doc."""

    def __init__(self, settings: RelaySettings, *,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        """``clock`` (monotonic ns) stamps, rate-limits and times out everything: tests inject
        a virtual one."""
        settings.validate()
        self._clock = clock
        self.settings = settings
        self.stats = RelayStats()
        self._upstreams = [
            Upstream(i, parse_address(spec), self.stats, settings.upstream_timeout_s,
                     self._on_upstream_result, clock=clock)
            for i, spec in enumerate(settings.upstreams)
        ]
        self._local = None if self._upstreams else LocalSource(settings.local_stratum)
        names = [u.name for u in self._upstreams] or [local_source.NAME]
        self._ke = KeProxy([parse_address(s) for s in settings.nts_ke_servers],
                           KeProxyLimits(stream_timeout_s=settings.nts_ke_timeout_s,
                                         per_guest_per_minute=settings.nts_ke_per_guest_per_minute))
        self._hello = framing.relay_hello(names, [str(a) for a in self._ke.endpoints]).payload
        # a Firecracker socket serves one microVM: its connections share one limit, and its
        # path names the guest in metrics
        self._one_guest_sockets = frozenset(
            a.listen_path for a in map(parse_address, settings.listen) if a.kind == "fc")
        self.guests = GuestRegistry(self._one_guest_sockets)
        self.metrics = RelayMetrics(names)
        self._figures = [self.metrics.upstreams[u.name] for u in self._upstreams]
        # host-clock mode reports as one upstream, "local", so per-upstream views aren't empty
        self._local_figures = self.metrics.upstreams[names[0]] if self._local else None
        self._residence = self.metrics.residence
        self._stall = StallWatch(clock=clock)
        #: guest connects/disconnects: a few lines a minute, then counts (churn is no flood)
        self._conn_log = EventGate()
        self._accepts = AcceptWatch(self.stats.accept_errors)
        self._budget = FdBudget(self.stats.errors)
        self._stale_ns = int(settings.stale_request_s * 1e9)
        self._max_pending = settings.max_pending
        self._collector = RelayCollector(self.stats, self.metrics, self.guests, self._in_flight,
                                         self._ke.counters, self._ke.reach,
                                         lambda: fd_families(self._budget.limit.soft,
                                                             self.stats.accept_errors))
        self.metrics_registry = make_registry(self._collector)
        self._metrics_server: MetricsServer | None = None
        self._listeners: list[StreamListener] = []
        self._connections: set[GuestConnection] = set()
        self._per_peer: dict[str, int] = {}  # connections held, by peer_key
        self._all_gone = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = False
        self._limits = ConnectionLimits(
            max_payload=settings.max_frame_bytes - framing.HEADER.size,
            idle_ns=int(settings.idle_timeout_s * 1e9),
            hello_ns=int(settings.hello_timeout_s * 1e9),
            rate=settings.rate_limit, burst=settings.rate_burst,
        )

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open upstream sockets and listen on every configured address (all or nothing)."""
        if self._started:
            return
        self._started = True
        self._stopped.clear()
        self._budget.raise_limit()
        try:
            self._accepts.install()
            self._stall.start()
            for upstream in self._upstreams:
                await upstream.open()
            for spec in self.settings.listen:
                self._listeners.append(await listen_protocol(
                    spec, self._new_connection, backlog=1024,
                    socket_mode=self.settings.socket_mode_bits,
                ))
            if self.settings.metrics:
                self._metrics_server = MetricsServer(self.settings.metrics, self.render_metrics,
                                                     self.status)
                await self._metrics_server.start()
            self._budget.measure_base(MAX_CLIENTS if self._metrics_server is not None else 0)
        except BaseException:
            await self.stop()
            raise
        log.info("relay listening on %s; upstreams: %s", ", ".join(str(a) for a in self.addresses),
                 ", ".join(self.settings.upstreams) or "host clock (local stratum)",
                 extra={"event": "relay_listening"})

    async def stop(self) -> None:
        """Stop listening, drop every connection and its pending requests, close upstreams."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            await listener.close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        for conn in list(self._connections):
            conn.close()
        if self._connections:
            self._all_gone.clear()
            try:
                await asyncio.wait_for(self._all_gone.wait(), _STOP_FLUSH_S)
            except TimeoutError:
                for conn in list(self._connections):
                    conn.close(abort=True)
                # aborting reports connection_lost on the next loop turns
                for _ in range(100):
                    if not self._connections:
                        break
                    await asyncio.sleep(0.01)
        await self._ke.stop()
        for upstream in self._upstreams:
            upstream.close()
        self._stall.stop()
        self._accepts.uninstall()
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
        """Accepted connections whose transport is not closed yet (there are no per-connection
        tasks since connections became protocols; kept for callers counting teardown)."""
        return len(self._connections)

    # --- connections (ConnectionOwner) -------------------------------------------------

    def _new_connection(self) -> GuestConnection:
        return GuestConnection(self, self.stats, self._limits, self._clock)

    def accept(self, conn: GuestConnection) -> bool:
        if self._accepts.failing:
            self._accepts.accepted()
        if len(self._connections) >= self.settings.max_connections:
            return False
        if len(self._connections) + self._ke.open_streams >= self._budget.room \
                and self._fds_short():  # far from the limit (the usual case): no call
            return False
        key, conn.peer_id = peer_of(conn, self._one_guest_sockets)
        if key is not None:
            held = self._per_peer.get(key, 0)
            if held >= self.settings.max_connections_per_guest:
                self.stats.errors["per_guest_limit"] += 1
                return False
            self._per_peer[key] = held + 1
            conn.peer_key = key
        self._connections.add(conn)
        return True

    def _fds_short(self) -> bool:
        held = len(self._connections) + self._ke.open_streams
        if held < self._budget.room:  # far from the limit: nothing to add up
            return False
        http = self._metrics_server.clients if self._metrics_server is not None else 0
        return self._budget.short(held + http)

    def on_closing(self, conn: GuestConnection) -> None:
        """Cancel pending upstream work first so no reply is written late."""
        for pending in conn.pending:
            pending.upstream.cancel(pending)
            self._figures[pending.upstream.index].cancelled += 1
        conn.pending.clear()
        self._ke.close_owner(conn)

    def on_gone(self, conn: GuestConnection) -> None:
        self._connections.discard(conn)
        if conn.peer_key is not None:
            left = self._per_peer.pop(conn.peer_key, 0) - 1
            if left > 0:
                self._per_peer[conn.peer_key] = left
        if not self._connections:
            self._all_gone.set()
        record = self.guests.disconnect(conn)
        if record is not None and log.isEnabledFor(logging.INFO):
            unlogged = self._conn_log.allow("disconnect")
            if unlogged is not None:
                log.info("guest %s (%r) disconnected%s", record.guest, record.name,
                         _unlogged(unlogged, "disconnects"),
                         extra={"event": "guest_disconnected", "guest": record.guest,
                                "guest_name": record.name, "reports": record.reports,
                                "unlogged": unlogged})

    def on_frame(self, conn: GuestConnection, frame: framing.Frame, rx_ns: int) -> None:
        ftype = frame.type
        self.stats.frames_in[FRAME_NAMES[ftype]] += 1
        if not conn.hello_done:
            self._on_hello(conn, frame, rx_ns)
        elif ftype == FrameType.HEALTH:
            self._on_health(conn, frame, rx_ns)  # observability only: never affects forwarding
        elif ftype in _STREAM_TYPES:
            if ftype == FrameType.STREAM_OPEN and not conn.bucket.take(rx_ns):
                self.stats.errors["rate_limited"] += 1
                conn.send_error(frame.request_id, ErrorCode.RATE_LIMITED,
                                "stream open rate limit exceeded")
                return
            if ftype == FrameType.STREAM_OPEN and self._fds_short():
                conn.send_error(frame.request_id, ErrorCode.BUSY,
                                "relay is short of file descriptors")
                return
            self._ke.on_frame(conn, frame, conn.send_frame)
        else:
            self.stats.errors["unexpected_frame"] += 1
            conn.send_error(frame.request_id, ErrorCode.BAD_FRAME,
                            f"{FRAME_NAMES[ftype]} is not accepted from a guest")

    def _on_hello(self, conn: GuestConnection, frame: framing.Frame, rx_ns: int) -> None:
        if frame.type != FrameType.HELLO:
            self.stats.errors["no_hello"] += 1
            conn.send_error(frame.request_id, ErrorCode.BAD_FRAME, "send HELLO first")
            conn.close()
            return
        try:
            hello = framing.parse_guest_hello(frame)  # other FramingErrors close the connection
        except framing.FramingError as exc:
            if exc.reason != "bad_hello_version":
                raise
            self.stats.errors["bad_hello_version"] += 1
            conn.send_error(frame.request_id, ErrorCode.BAD_FRAME, str(exc).split(": ", 1)[-1])
            conn.close()
            return
        conn.name = display_name(hello.name)
        if hello.request_timeout_s is not None:
            conn.stale_ns = int(hello.request_timeout_s * 1e9)  # the guest's own deadline
        conn.hello_done = True
        conn.deadline_ns = rx_ns + self._limits.idle_ns
        conn.send_frame(framing.Frame(FrameType.HELLO, frame.request_id, self._hello))
        record = self.guests.connect(conn, conn, conn.name, rx_ns, conn.peer_id)
        if log.isEnabledFor(logging.INFO):
            unlogged = self._conn_log.allow("connect")
            if unlogged is not None:
                log.info("guest %s (%r) connected%s", record.guest, conn.name,
                         _unlogged(unlogged, "connects"),
                         extra={"event": "guest_connected", "guest": record.guest,
                                "guest_name": conn.name, "unlogged": unlogged})

    # --- the NTP path ------------------------------------------------------------------

    def on_ntp_request(self, conn: GuestConnection, rid: int, data: bytes, start: int,
                       end: int, rx_ns: int) -> None:
        stats = self.stats
        stats.frames_in["NTP_REQUEST"] += 1
        size = end - start - 1  # NTP packet after the upstream index byte
        if size < 0:
            raise FramingError("bad_payload", "NTP request without upstream index")
        if not conn.bucket.take(rx_ns):
            stats.errors["rate_limited"] += 1
            conn.send_error(rid, ErrorCode.RATE_LIMITED, "request rate limit exceeded")
            return
        index = data[start]
        upstreams = self._upstreams
        if index >= len(upstreams) and not (self._local is not None and index == 0):
            stats.errors["unknown_upstream"] += 1
            conn.send_error(rid, ErrorCode.UNKNOWN_UPSTREAM, f"no upstream {index}")
            return
        if not (HEADER_LEN <= size <= MAX_PACKET_LEN and size % 4 == 0
                and data[start + 1] & 7 == Mode.CLIENT):
            stats.errors["bad_packet"] += 1
            conn.send_error(rid, ErrorCode.BAD_FRAME, "not an NTP client request")
            return
        packet = data[start + 1:end]
        if self._local is not None:
            self._answer_locally(conn, rid, packet, rx_ns)
            return
        if len(conn.pending) >= self._max_pending:
            stats.errors["busy"] += 1
            conn.send_error(rid, ErrorCode.BUSY, "too many requests in flight")
            return
        upstream = upstreams[index]
        queued_ns = self._queued_ns(conn, rx_ns) if self._stall.suspect(rx_ns) else 0
        if queued_ns and queued_ns > (conn.stale_ns or self._stale_ns):
            # the guest has given up on it: forwarding would only load the upstream
            stats.stale_requests += 1
            self._figures[index].stale += 1
            conn.send_error(rid, ErrorCode.UPSTREAM_TIMEOUT,
                            f"stale: queued up to {queued_ns / 1e9:.1f} s in a stalled relay")
            return
        try:
            pending = upstream.submit(packet, conn, rid, rx_ns)
        except UpstreamError as exc:
            reason = exc.reason
            stats.errors[reason] += 1
            if reason != "duplicate_transmit":  # that one is the guest's mistake
                stats.upstream_errors += 1
                fig = self._figures[index]
                fig.requests += 1  # a request that failed to leave is still a request
                fig.errors[reason] += 1
                self._reach_poll(upstream, fig, False, rx_ns)
            conn.send_error(rid, ErrorCode.UPSTREAM_ERROR, str(exc))
            return
        self._figures[index].requests += 1
        conn.pending.add(pending)

    def _queued_ns(self, conn: GuestConnection, rx_ns: int) -> int:
        """Up to how long a frame read at ``rx_ns`` may have waited in the socket: the
        stall's length for a connection's first read after one (see ``stall``), else 0."""
        stall, gap = self._stall.catchup(rx_ns)
        if not stall:
            return 0
        if conn.catchup_stall != stall:
            conn.catchup_stall = stall
            conn.catchup_rx_ns = rx_ns
        return gap if conn.catchup_rx_ns == rx_ns else 0

    def _reach_poll(self, upstream: Upstream, fig: UpstreamFigures, ok: bool,
                    now_ns: int) -> None:
        change = fig.reach.poll(ok, now_ns)
        if change == "unreachable":
            log.warning("upstream %s is unreachable: no reply to the last %d requests",
                        upstream.name, min(fig.reach.polls, 8),
                        extra={"event": "upstream_unreachable", "upstream": upstream.name})
        elif change == "reachable":
            age = fig.reach_lost_ns
            log.warning("upstream %s is reachable again%s", upstream.name,
                        f" after {(now_ns - age) / 1e9:.1f} s" if age else "",
                        extra={"event": "upstream_reachable", "upstream": upstream.name})
        if change is not None:
            fig.reach_lost_ns = now_ns if change == "unreachable" else 0

    def _on_upstream_result(self, pending: Pending, reply: bytes | None, at_ns: int,
                            reason: str) -> None:
        conn: GuestConnection = pending.owner
        conn.pending.discard(pending)
        upstream = pending.upstream
        sent_ns = pending.sent_ns
        if reply is not None:
            fig = self._figures[upstream.index]
            fig.replies += 1
            if fig.failing:  # the episode is over: the next failure is news again
                fig.failing = 0
            reach = fig.reach
            if reach.reported_reachable:  # the hot path: reachable and staying so
                reach.register = ((reach.register << 1) | 1) & 0xFF
                reach.polls += 1
                reach.last_reply_ns = at_ns
            else:
                self._reach_poll(upstream, fig, True, at_ns)
            fig.rtt.observe_ns(at_ns - sent_ns)
            if not conn.closed:
                r_in = sent_ns - pending.rx_ns
                r_out = self._clock() - at_ns
                conn.write(REPLY_HEAD.pack(
                    framing.VERSION, _REPLY_TYPE, 8 + len(reply), pending.request_id,
                    r_in if r_in < _CLAMP else _CLAMP, r_out if r_out < _CLAMP else _CLAMP,
                ) + reply)
                self.stats.frames_out["NTP_REPLY"] += 1
                self._residence.observe_ns(r_in + r_out)
            return
        fig = self._figures[upstream.index]
        fig.result(reason, at_ns - sent_ns)
        if reason != "closed":  # the relay shutting down says nothing about the upstream
            self._reach_poll(upstream, fig, False, at_ns)
        fig.failing += 1
        if decade(fig.failing):  # one ICMP error can fail thousands of requests at once
            log.warning("upstream %s: request failed (%s; %d in a row)", upstream.name, reason,
                        fig.failing, extra={"event": "upstream_failure",
                                            "upstream": upstream.name, "reason": reason,
                                            "count": fig.failing})
        if not conn.closed:
            code = ErrorCode.UPSTREAM_TIMEOUT if reason == "timeout" else \
                ErrorCode.UPSTREAM_ERROR
            conn.send_error(pending.request_id, code, f"upstream {upstream.name}: {reason}")

    def _answer_locally(self, conn: GuestConnection, rid: int, packet: bytes,
                        rx_ns: int) -> None:
        assert self._local is not None and self._local_figures is not None
        figures = self._local_figures
        figures.requests += 1
        start_ns = self._clock()
        try:
            reply = self._local.answer(packet)
        except PacketError as exc:
            self.stats.errors["bad_packet"] += 1
            figures.result("bad_packet", 0)
            conn.send_error(rid, ErrorCode.BAD_FRAME, str(exc))
            return
        done_ns = self._clock()
        self.stats.local_replies += 1
        figures.result("", done_ns - start_ns)
        self.metrics.observe_residence(done_ns - rx_ns)
        conn.send_frame(framing.ntp_reply(rid, reply, start_ns - rx_ns,
                                          self._clock() - done_ns))

    # --- observability ---------------------------------------------------------------

    def _on_health(self, conn: GuestConnection, frame: framing.Frame, rx_ns: int) -> None:
        """Keep the guest's report for metrics; a bad or too-frequent one is only counted."""
        try:
            self.guests.report(conn, frame.payload, rx_ns,
                               charge=not (self._stall.suspect(rx_ns)
                                           and self._queued_ns(conn, rx_ns)))
        except HealthError as exc:
            self.stats.errors[f"health_{exc.reason}"] += 1
            record = self.guests.get(conn)
            refused = record.refused_reports if record else 1
            if decade(refused):
                log.warning("health report refused: %s (%d refused from this guest)", exc,
                            refused, extra={"event": "health_refused", "reason": exc.reason,
                                            "guest": record.guest if record else "?",
                                            "count": refused})

    def _in_flight(self, name: str) -> int:
        return sum(u.in_flight for u in self._upstreams if u.name == name)


def _unlogged(n: int, what: str) -> str:
    return f" ({n} more guest {what} not logged in the minute before)" if n else ""
