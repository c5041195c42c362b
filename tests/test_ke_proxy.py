"""The relay's NTS-KE pass-through with raw frames: bytes only, bounded, nothing leaks.

A loopback TCP echo server stands in for the NTS-KE server (the relay never parses the
stream, so any byte stream shows what it does). Real NTS-KE through it: test_nts_relay.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from nts_fixture import free_port
from relay_helpers import Guest

from host_relay.ke_proxy import KeProxyLimits
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameType

pytestmark = pytest.mark.timeout(30)


class Echo:
    """TCP echo server counting its open connections."""

    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        try:
            while data := await r.read(65536):
                if data == b"bye":
                    break
                w.write(data)
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def until(cond: object, timeout: float = 3.0) -> None:
    assert callable(cond)
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_stream_pass_through_limits_and_cleanup(tmp_path: Path) -> None:
    async def main() -> None:
        echo = Echo()
        port = await echo.start()
        sock = tmp_path / "r.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           nts_ke_servers=(f"tcp:127.0.0.1:{port}",),
                                           rate_limit=1000.0, rate_burst=100))
        await relay.start()
        try:
            relay.ke_proxy.limits = KeProxyLimits(max_streams=2, max_stream_bytes=20_000)
            fds = len(os.listdir("/proc/self/fd"))
            guest = await Guest.connect(f"unix:{sock}")
            try:
                assert guest.hello["nts_ke"] == [{"index": 0, "name": f"tcp:127.0.0.1:{port}"}]
                # open, send early (before the ack), get the bytes back unchanged
                guest.send(framing.stream_open(5, 0))
                for f in framing.stream_data(5, b"x" * 5000):
                    guest.send(f)
                first = await guest.recv()
                assert (first.type, first.request_id, first.payload) == (
                    FrameType.STREAM_OPEN, 5, b"")
                got = b""
                while len(got) < 5000:
                    f = await guest.recv()
                    assert (f.type, f.request_id) == (FrameType.STREAM_DATA, 5)
                    got += f.payload
                assert got == b"x" * 5000
                # the endpoint ends the stream: a clean STREAM_CLOSE
                guest.send(framing.stream_data(5, b"bye")[0])
                f = await guest.recv()
                assert (f.type, f.request_id, framing.parse_stream_close(f)) == (
                    FrameType.STREAM_CLOSE, 5, "")
                # unknown endpoint and kind are refused with an error naming the stream
                guest.send(framing.stream_open(6, 3))
                f = await guest.recv()
                assert f.type == FrameType.ERROR and f.request_id == 6
                assert framing.parse_error(f)[0] == ErrorCode.UNKNOWN_ENDPOINT
                # at most two streams per connection
                for sid in (7, 8, 9):
                    guest.send(framing.stream_open(sid, 0))
                frames = [await guest.recv() for _ in range(3)]
                errors = [f for f in frames if f.type == FrameType.ERROR]
                assert [f.request_id for f in errors] == [9]
                assert framing.parse_error(errors[0])[0] == ErrorCode.BUSY
                # more than max_stream_bytes: the stream is closed with a reason
                for f in framing.stream_data(7, b"y" * 25_000):
                    guest.send(f)
                while True:
                    f = await guest.recv()
                    if f.type == FrameType.STREAM_CLOSE and f.request_id == 7:
                        break
                assert "limit" in framing.parse_stream_close(f)
                await until(lambda: echo.open == 1)  # stream 8 still up
                counters = relay.ke_proxy.counters
                assert counters["stream_too_long"] == 1 and counters["too_many_streams"] == 1
                assert counters["unknown_endpoint"] == 1
            finally:
                await guest.close()
            # the guest went away: its remaining stream and the endpoint connection are gone
            await until(lambda: relay.ke_proxy.open_streams == 0 and echo.open == 0)
        finally:
            await relay.stop()
            await echo.stop()
        await until(lambda: len(os.listdir("/proc/self/fd")) <= fds)

    asyncio.run(main())


def test_unreachable_endpoint_and_stream_frames_for_unknown_ids(tmp_path: Path) -> None:
    async def main() -> None:
        echo = Echo()
        port = await echo.start()
        await echo.stop()  # nothing listens there any more: connect is refused
        await asyncio.sleep(0.05)
        sock = tmp_path / "r.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           nts_ke_servers=(f"tcp:127.0.0.1:{port}",)))
        await relay.start()
        guest = await Guest.connect(f"unix:{sock}")
        try:
            guest.send(framing.stream_open(3, 0))
            f = await guest.recv()
            assert f.type == FrameType.ERROR and f.request_id == 3
            assert framing.parse_error(f)[0] == ErrorCode.STREAM_FAILED
            guest.send(framing.stream_data(42, b"stray")[0])  # no such stream
            f = await guest.recv()
            assert (f.type, f.request_id) == (FrameType.STREAM_CLOSE, 42)
            guest.send(framing.stream_close(43))  # ignored, connection stays up
            guest.send(framing.Frame(FrameType.STREAM_OPEN, 44, b"\x01"))  # malformed
            assert await guest.closed_by_peer()
            assert relay.stats.errors["bad_payload"] == 1
            assert relay.ke_proxy.counters["connect_failed"] == 1
        finally:
            await guest.close()
            await relay.stop()

    asyncio.run(main())


def test_endpoint_reach_register_follows_connects_and_logs_each_change(tmp_path: Path,
                                                                        caplog) -> None:
    import logging

    async def main() -> None:
        echo = Echo()
        port = await echo.start()
        await echo.stop()  # down at first: connects are refused
        await asyncio.sleep(0.05)
        sock = tmp_path / "r.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           nts_ke_servers=(f"tcp:127.0.0.1:{port}",)))
        await relay.start()
        guest = await Guest.connect(f"unix:{sock}")
        name = f"tcp:127.0.0.1:{port}"
        back: asyncio.Server | None = None
        try:
            for sid in range(2):
                guest.send(framing.stream_open(sid, 0))
                assert (await guest.recv()).type == FrameType.ERROR
            ke = relay.status()["nts_ke_endpoints"]
            assert ke == [{"name": name, "reachable": False, "reach": "000", "reach_ratio": 0.0,
                           "polls": 2, "last_reply_age_s": None}]
            back = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            guest.send(framing.stream_open(5, 0))
            assert (await guest.recv()).type == FrameType.STREAM_OPEN  # the ack
            ke = relay.status()["nts_ke_endpoints"][0]
            assert ke["reachable"] is True and ke["reach"] == "001"
            body = relay.render_metrics().decode()
            assert f'timesync_relay_nts_ke_reachable{{source_address="{name}"}} 1.0' in body
            assert f'timesync_relay_nts_ke_reach_ratio{{source_address="{name}"}} 0.333' in body
            age = "timesync_relay_nts_ke_last_reply_age_seconds"
            assert f'{age}{{source_address="{name}"}}' in body
        finally:
            await guest.close()
            if back is not None:
                back.close()
            await relay.stop()

    with caplog.at_level(logging.WARNING, logger="host_relay"):
        asyncio.run(main())
    events = [getattr(r, "event", "") for r in caplog.records
              if getattr(r, "event", "").startswith("nts_ke_") and "reach" in r.event]
    assert events == ["nts_ke_unreachable", "nts_ke_reachable"]
def test_ke_streams_have_a_per_guest_budget_across_connections(tmp_path: Path) -> None:
    """Issue 10 item 6. Before the fix STREAM_OPEN drew only on each connection's NTP bucket
    (16/s, burst 32) and a guest may hold 64 connections: ~1,000 TLS handshakes a second
    from the host's address to a third party. Now a guest (here: one TCP host with two
    connections) gets a few a minute in all, and the refusals show on /metrics."""
    async def main() -> None:
        echo = Echo()
        port = await echo.start()
        listen = f"tcp:127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        relay = RelayService(RelaySettings(listen=(listen,),
                                           nts_ke_servers=(f"tcp:127.0.0.1:{port}",),
                                           rate_limit=1000.0, rate_burst=100))
        await relay.start()
        guests = [await Guest.connect(listen), await Guest.connect(listen)]
        outcomes = []
        try:
            for i in range(12):
                guest, sid = guests[i % 2], 100 + i
                guest.send(framing.stream_open(sid, 0))
                f = await guest.recv()
                assert f.request_id == sid
                outcomes.append(f.type)
                if f.type == FrameType.ERROR:
                    assert framing.parse_error(f)[0] == ErrorCode.RATE_LIMITED
                    assert "per guest" in framing.parse_error(f)[1]
                else:
                    guest.send(framing.stream_close(sid))
            assert outcomes.count(FrameType.STREAM_OPEN) == 8  # the burst, shared
            assert outcomes[8:] == [FrameType.ERROR] * 4
            assert relay.ke_proxy.counters["guest_budget_exceeded"] == 4
            assert echo.accepted == 8
            text = relay.render_metrics().decode()
            assert 'timesync_relay_nts_ke_streams_total{event="guest_budget_exceeded"} 4.0' \
                in text
        finally:
            for guest in guests:
                await guest.close()
            await relay.stop()
            await echo.stop()

    asyncio.run(main())
