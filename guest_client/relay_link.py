"""The guest's connection to the host relay: the asyncio driver of
:class:`guest_client.link_protocol.LinkProtocol` (HELLO, request ids, streams, dispatch),
adding the socket, per-request timers, the stall guard and reconnect with backoff.

One stream carries every upstream's requests; the link never interprets NTP. Receive stamps
are taken in one place, ``SessionWire.data_received`` (:mod:`guest_client.link_session`), when
the transport hands the bytes over, not when a reading task wakes up: that is one event-loop
iteration later, and everything the loop runs in between would otherwise be counted as
return-path delay (measured: +10..+25 us on loopback). Transmit stamps (``last_tx_ns``) are
taken just before the write.

A relay that stops reading must not grow the guest's memory: once more than
:data:`MAX_WRITE_BUFFER` bytes wait unsent, sends are refused (``send_busy``) and the link is
dropped and reconnected (``relay_stalled``). The reconnect backoff only resets after a session
stayed up :data:`STABLE_SESSION_S`, so a relay that answers HELLO and drops us at once is not
hammered.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from guest_client.link_protocol import (
    HelloAccepted,
    LinkProtocol,
    Refused,
    RelayFailure,
    RelayProtocolError,
    RelayReply,
    RequestDone,
    StreamFrame,
    Upstream,
)
from guest_client.link_session import LinkSession, SessionWire
from timesyncd.aio import cancel_task
from timesyncd.framing import Frame, FramingError
from timesyncd.transport import TransportError, open_stream

__all__ = ["RelayFailure", "RelayLink", "RelayReply", "ReplyCallback", "Upstream"]

log = logging.getLogger(__name__)

#: Unsent bytes the guest queues for the relay before calling it stalled (as the relay's own
#: ``host_relay.connection.MAX_WRITE_BUFFER`` does for guests that stop reading).
MAX_WRITE_BUFFER = 256 * 1024
#: A session must stay up this long (seconds) before the reconnect backoff starts over; a
#: relay that answers HELLO and closes at once must not be hammered at reconnect_min_s.
STABLE_SESSION_S = 10.0

ReplyCallback = Callable[[RelayReply | RelayFailure], None]
StreamHandler = Callable[[Frame], None]
#: opens a stream to an address: ``timesyncd.transport.open_stream`` or a test double. The
#: driver takes the transport over (``set_protocol``) before anything can arrive: the relay
#: speaks only after our HELLO, so the reader holds no bytes yet.
Connector = Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class _Pending:
    callback: ReplyCallback
    timer: asyncio.TimerHandle


class RelayLink:
    """Keeps one connection to ``address`` up; ``send`` requests over it.

    ``on_up(upstreams)`` runs after each successful HELLO, ``on_down(reason)`` when an
    established connection is lost. Outstanding requests then fail with ``connection_lost``
    (counted as ``lost_in_flight``). A refused :meth:`send` leaves its reason, as a caller
    should report it, in :attr:`last_refusal`. The protocol itself is
    :class:`guest_client.link_protocol.LinkProtocol`; this driver adds the socket, the
    per-request timers, the stall guard and the reconnect policy.
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
        self._clock = rx_clock  # stamps both ways: t4 on arrival, t1 just before the write
        self._on_up = on_up
        self._on_down = on_down
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.request_timeout_s = request_timeout_s
        self.max_write_buffer = max_write_buffer
        self.stable_session_s = stable_session_s
        self._rng = rng or random.Random()
        self._connect = connect or (lambda a: open_stream(a, timeout_s=request_timeout_s))
        self.proto: LinkProtocol[_Pending, StreamHandler] = LinkProtocol(
            guest_name, request_timeout_s=request_timeout_s, max_pending=max_pending,
            address=address)
        self._transport: Any = None
        self._up = False  # HELLO answered and on_up run: requests may go
        self._session_state: LinkSession | None = None
        #: set when we gave up on the current connection (stalled relay); its session ends soon
        self._drop_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.upstreams: list[Upstream] = []
        #: the relay's whole HELLO object (e.g. its ``nts_ke`` endpoint list)
        self.hello_info: dict[str, object] = {}
        self.connects = 0
        #: the latest problem, for status; cleared by each successful HELLO
        self.last_error = ""
        #: the latest warning logged: a relay failing the same way again stays quiet until a
        #: session has been stable (``last_error`` is cleared on every HELLO, so cannot serve)
        self._last_logged = ""
        #: why the latest refused :meth:`send` was refused, as the caller should report it
        self.last_refusal = ""
        #: the disciplined-clock stamp taken just before the latest request was written (t1)
        self.last_tx_ns: int | None = None

    @property
    def counters(self) -> Counter[str]:
        return self.proto.counters

    @property
    def connected(self) -> bool:
        return self._up and self._drop_reason is None

    @property
    def pending(self) -> int:
        return self.proto.pending

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

    # --- sending -------------------------------------------------------------------------

    def send(self, upstream: int, packet: bytes, callback: ReplyCallback) -> int | None:
        """Frame and write one NTP request; ``None`` if not possible, the reason counted and
        left in :attr:`last_refusal` (``relay_not_connected``, ``send_busy``,
        ``send_oversized``). On success :attr:`last_tx_ns` is the request's t1: stamped
        after framing and just before the write, so it is never later than the bytes left
        (a stamp after the write could be, and made the first exchanges' delay negative)."""
        if not self.connected:
            self._refused(self.proto.refuse("send_not_connected", "relay_not_connected"))
            return None
        prepared = self.proto.prepare_request(upstream, packet)
        if isinstance(prepared, Refused):
            self._refused(prepared)
            return None
        rid, data = prepared
        if not self._room_for(len(data)):
            self._refused(self.proto.refuse("send_busy", "send_busy"))
            return None
        timer = asyncio.get_running_loop().call_later(self.request_timeout_s, self._expire, rid)
        self.proto.track(rid, _Pending(callback, timer))
        self.last_tx_ns = self._clock()
        self._transport.write(data)
        return rid

    def _refused(self, refused: Refused) -> None:
        self.last_refusal = refused.reason

    def _room_for(self, size: int) -> bool:
        """False, and the link dropped, once the relay lets too much pile up unsent: a relay
        that stopped reading would otherwise grow our memory without limit while every
        request times out and the link still looks connected."""
        transport = self._transport
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
        if self._transport is not None and self._drop_reason is None:
            self.counters["reset"] += 1
            self._drop_reason = reason
            self._transport.abort()

    def open_stream(self, handler: StreamHandler) -> int | None:
        """Register a stream id whose STREAM_*/ERROR frames go to ``handler``; None if down.

        When the connection drops, ``handler`` gets a STREAM_CLOSE with reason
        ``connection_lost``. The caller sends STREAM_OPEN itself (:meth:`send_frame`).
        """
        if not self.connected:
            self.counters["send_not_connected"] += 1
            return None
        return self.proto.open_stream(handler)

    def close_stream(self, sid: int, reason: str = "") -> None:
        """Forget a stream, telling the relay unless it already ended it."""
        data = self.proto.close_stream(sid, reason)
        if data is not None:
            self._write(data)

    def send_frame(self, frame: Frame) -> bool:
        """Write one frame as is (streams, health); False when not connected or stalled."""
        return self._write(frame.encode())

    def _write(self, data: bytes) -> bool:
        if not self.connected:
            return False
        if not self._room_for(len(data)):
            self.counters["send_busy"] += 1
            return False
        self._transport.write(data)
        return True

    def cancel(self, rid: int) -> None:
        """Forget a request (its reply, if any, is then counted as unsolicited)."""
        p = self.proto.forget(rid)
        if p is not None:
            p.timer.cancel()

    def _expire(self, rid: int) -> None:
        done = self.proto.expire(rid)
        if done is not None:
            done.token.callback(done.result)

    # --- events from the protocol --------------------------------------------------------

    def _deliver(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, RequestDone):
                event.token.timer.cancel()
                event.token.callback(event.result)
            elif isinstance(event, StreamFrame):
                event.token(event.frame)
            elif isinstance(event, HelloAccepted) and self._session_state is not None:
                self.upstreams, self.hello_info = event.upstreams, event.info
                self._session_state.hello.set_result(event.upstreams)

    def _data_received(self, session: LinkSession, data: bytes, rx_ns: int) -> None:
        if session is not self._session_state or session.ended.done():
            return
        try:
            self._deliver(self.proto.receive_data(data, rx_ns))
        except FramingError as exc:
            if session.hello.done():
                self.counters[f"framing_{exc.reason}"] += 1
                session.end(f"framing error: {exc}")
            else:
                session.fail(exc)
            self._transport.abort()
        except RelayProtocolError as exc:
            session.fail(exc)
            self._transport.abort()
        except Exception as exc:  # a bug in a callback: the driver's task must see it
            session.fail(exc)

    def _connection_lost(self, session: LinkSession, exc: Exception | None) -> None:
        if session.hello.done():
            session.end(f"connection error: {exc}" if exc is not None else "closed by relay")
        elif exc is not None:
            session.fail(ConnectionError(str(exc)))
        else:
            session.fail(RelayProtocolError("closed", "connection closed before HELLO"))

    # --- connection loop -----------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = min(self.reconnect_max_s, self.reconnect_min_s * 2.0 ** min(attempt, 30))
        return base * self._rng.uniform(0.5, 1.0)

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                _, writer = await self._connect(self.address)
            except (TransportError, OSError) as exc:
                reason = getattr(exc, "reason", "os_error")
                self.counters[f"connect_{reason}"] += 1
                self._note_error(f"connect to relay {self.address} failed: {exc}")
            else:
                try:
                    uptime = await self._session(writer.transport)
                finally:
                    writer.close()
                if uptime is not None and uptime >= self.stable_session_s:
                    attempt = 0  # a flapping relay (HELLO, then gone) keeps backing off
            delay = self._backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)

    async def _session(self, transport: Any) -> float | None:
        """Run one connection; how long it was up after HELLO (s), None if it never was."""
        session = self._session_state = LinkSession()
        transport.set_protocol(SessionWire(
            self._clock, lambda data, rx_ns: self._data_received(session, data, rx_ns),
            lambda exc: self._connection_lost(session, exc)))
        self._transport = transport
        self._drop_reason = None
        try:
            transport.write(self.proto.connection_made())
            async with asyncio.timeout(self.request_timeout_s):  # wait_for may swallow cancel
                upstreams = await session.hello
        except TimeoutError:
            self._hello_failed("hello_timeout", f"relay {self.address} did not answer HELLO")
            return None
        except (RelayProtocolError, FramingError) as exc:
            self._hello_failed(f"hello_{exc.reason}", f"relay {self.address} HELLO failed: {exc}")
            return None
        except (ConnectionError, OSError) as exc:
            self._hello_failed("hello_connection_lost",
                               f"relay {self.address} closed during HELLO: {exc}")
            return None
        self.connects += 1
        self._up = True
        self.last_error = ""
        loop = asyncio.get_running_loop()
        up_since = loop.time()
        log.info("connected to relay %s; upstreams: %s", self.address,
                 ", ".join(u.name for u in upstreams) or "none")
        self._on_up(upstreams)
        reason = await session.ended
        if self._drop_reason is not None:  # we hung up: that is the reason, not the EOF
            reason = self._drop_reason
        uptime = loop.time() - up_since
        if uptime >= self.stable_session_s:
            self._last_logged = ""  # a new episode: its first problem is worth a warning
        self._note_error(f"lost relay {self.address}: {reason}")
        self._close(reason, notify=True)
        return uptime

    def _hello_failed(self, counter: str, message: str) -> None:
        self.counters[counter] += 1
        self._note_error(message)
        self._close(message, notify=False)

    def _close(self, reason: str, notify: bool) -> None:
        was_up, self._up = self._up, False
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._session_state = None
        self._drop_reason = None
        # a stop() fails them too: else the callers would wait for them forever
        self._deliver(self.proto.connection_lost(reason, counted=notify))
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
