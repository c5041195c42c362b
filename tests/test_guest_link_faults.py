"""The guest's relay link against relays that misbehave at the transport level.

A relay that stops reading, one that answers HELLO and hangs up at once, and requests lost
when the link drops: each must end counted, bounded and visible, never as silent growth or a
reconnect storm. Relays here are raw asyncio servers on Unix sockets in temp dirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from guest_fakes import FakeRelay
from loops import wait_for

from guest_client.relay_link import RelayFailure, RelayLink, RelayReply, Upstream
from timesyncd import framing
from timesyncd.framing import FrameType

#: the link's high-water mark (relay_link.MAX_WRITE_BUFFER), spelled out so this file also
#: runs against a link that lacks the constant
MARK = 256 * 1024
HELLO = framing.json_frame(
    FrameType.HELLO, 0,
    {"version": framing.VERSION, "upstreams": [{"index": 0, "name": "local"}]}).encode()

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawRelay:
    """A Unix-socket server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._dir = tempfile.mkdtemp(prefix="ts-link-faults-")
        self.path = os.path.join(self._dir, "relay.sock")
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def __aenter__(self) -> RawRelay:
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)




def make_link(address: str, **kwargs: Any) -> tuple[RelayLink, list[list[Upstream]], list[str]]:
    ups: list[list[Upstream]] = []
    downs: list[str] = []
    kwargs.setdefault("rng", random.Random(1))
    link = RelayLink(address, "g", rx_clock=time.time_ns, on_up=ups.append,
                     on_down=downs.append, **kwargs)
    return link, ups, downs


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def link_warnings() -> Any:
    logger = logging.getLogger("guest_client.relay_link")
    handler = _Warnings()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


# --- a relay that answers HELLO, then stops reading -------------------------------------------


async def _hello_then_never_read(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)  # the HELLO
    writer.write(HELLO)
    await asyncio.sleep(30)  # never reads again (cancelled at teardown)


def test_stalled_relay_bounds_the_write_buffer_and_drops_the_link() -> None:
    """Before the fix the buffer grew past the mark while the link stayed 'connected'."""
    results: list[RelayReply | RelayFailure] = []
    packet = b"\x23" + bytes(2000 - 1)  # a request with extension fields: ~2 KB a frame

    async def main() -> None:
        with link_warnings() as warned:
            async with RawRelay(_hello_then_never_read) as relay:
                await stall(relay)
        assert sum("stalled" in m for m in warned) == 1, warned  # logged once

    async def stall(relay: RawRelay) -> None:
        link, ups, downs = make_link(relay.address, reconnect_min_s=0.01,
                                     reconnect_max_s=0.02, request_timeout_s=60.0)
        await link.start()
        try:
            await wait_for(lambda: link.connected)
            most = 0
            sent = 0
            for i in range(4 * MARK // len(packet)):  # 4x the mark: bounded, ~0.1 s
                if not link.connected:
                    break
                if link.send(0, packet, results.append) is not None:
                    sent += 1
                transport = link._transport
                if transport is not None:
                    most = max(most, transport.get_write_buffer_size())
                if i % 16 == 0:
                    await asyncio.sleep(0)  # let the kernel buffer fill first
            assert most <= MARK, f"write buffer reached {most} bytes"
            assert link.counters["relay_stalled"] == 1
            assert link.counters["send_busy"] >= 1
            assert link.last_refusal == "send_busy"
            # dropped (on_down once, with the reason) and reconnected
            await wait_for(lambda: len(ups) == 2 and relay.connections == 2)
            assert len(downs) == 1 and "stalled" in downs[0]
            # every request in flight failed, and is counted
            assert link.counters["lost_in_flight"] == sent
            assert sum(isinstance(r, RelayFailure) and r.reason == "connection_lost"
                       for r in results) == sent
        finally:
            await link.stop()

    asyncio.run(asyncio.wait_for(main(), 15))


# --- a relay that answers HELLO, then hangs up at once ----------------------------------------


async def _hello_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    writer.write(HELLO)
    await writer.drain()
    writer.close()


def test_relay_that_hangs_up_after_hello_gets_backoff_and_one_warning() -> None:
    """Before the fix every session reset the backoff (one connect per reconnect_min_s, ~75
    here) and each cycle warned again."""
    times: list[float] = []
    min_s, max_s, run_s = 0.02, 0.32, 1.5

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        with link_warnings() as warned:
            async with RawRelay(_hello_then_close) as relay:
                link = RelayLink(relay.address, "g", rx_clock=time.time_ns,
                                 on_up=lambda u: times.append(loop.time()),
                                 on_down=lambda r: None, reconnect_min_s=min_s,
                                 reconnect_max_s=max_s, rng=random.Random(1))
                await link.start()
                try:
                    await asyncio.sleep(run_s)
                finally:
                    await link.stop()
            return list(warned)

    warned = asyncio.run(main())
    # backoff: without it >= run_s / min_s = 75 connects; with it a few doublings then max_s
    assert 3 <= len(times) <= 15, len(times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[-1] >= 0.5 * max_s > 4 * min_s, gaps  # the cap (with jitter), not the floor
    # the same loss, again and again: warned once, not once (or twice) per cycle
    lost = [m for m in warned if "lost relay" in m]
    assert len(lost) == 1, warned
    assert len(warned) <= 2, warned


def test_backoff_resets_after_a_stable_session_and_each_loss_is_logged() -> None:
    """A session that stayed up ``stable_session_s`` is a real outage when it ends: reconnect
    promptly and warn again."""
    times: list[float] = []

    async def hold_then_close(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(HELLO)
        await asyncio.sleep(0.15)
        writer.close()

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        with link_warnings() as warned:
            async with RawRelay(hold_then_close) as relay:
                link = RelayLink(relay.address, "g", rx_clock=time.time_ns,
                                 on_up=lambda u: times.append(loop.time()),
                                 on_down=lambda r: None, reconnect_min_s=0.02,
                                 reconnect_max_s=5.0, stable_session_s=0.1,
                                 rng=random.Random(1))
                await link.start()
                try:
                    await wait_for(lambda: len(times) >= 5, timeout=5.0)
                finally:
                    await link.stop()
            return list(warned)

    warned = asyncio.run(main())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g < 0.15 + 0.2 for g in gaps), gaps  # never the 5 s cap: no backoff build-up
    assert sum("lost relay" in m for m in warned) >= 4, warned


# --- requests lost with the link --------------------------------------------------------------


def test_requests_lost_with_the_link_are_counted() -> None:
    """Before the fix they failed with connection_lost and were counted nowhere."""
    results: list[RelayReply | RelayFailure] = []

    async def main() -> None:
        relay = FakeRelay(mode="silent")
        await relay.start()
        link, ups, downs = make_link(relay.address, reconnect_min_s=0.02, reconnect_max_s=0.05)
        await link.start()
        try:
            await wait_for(lambda: link.connected)
            assert link.send(0, b"\x23" + bytes(47), results.append) is not None
            await wait_for(lambda: relay.requests == 1)
            await relay.drop_clients()
            await wait_for(lambda: len(downs) == 1)
            assert link.counters["lost_in_flight"] == 1
            assert results == [RelayFailure("connection_lost", downs[0])]
        finally:
            await link.stop()
            await relay.stop()
        assert link.counters["lost_in_flight"] == 1  # stop() is not a loss

    asyncio.run(asyncio.wait_for(main(), 10))


@pytest.mark.parametrize("case", ["not_connected", "oversized", "busy"])
def test_refused_send_leaves_its_real_reason(case: str) -> None:
    async def main() -> None:
        relay = FakeRelay(mode="silent")
        await relay.start()
        link, _, _ = make_link(relay.address, max_pending=1)
        try:
            if case == "not_connected":
                assert link.send(0, b"\x23" + bytes(47), lambda r: None) is None
                assert link.last_refusal == "relay_not_connected"
                return
            await link.start()
            await wait_for(lambda: link.connected)
            if case == "oversized":
                assert link.send(0, bytes(framing.MAX_PAYLOAD), lambda r: None) is None
                assert (link.last_refusal, link.counters["send_oversized"]) == (
                    "send_oversized", 1)
            else:
                assert link.send(0, b"\x23" + bytes(47), lambda r: None) is not None
                assert link.send(0, b"\x23" + bytes(47), lambda r: None) is None
                assert (link.last_refusal, link.counters["send_busy"]) == ("send_busy", 1)
        finally:
            await link.stop()
            await relay.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
