"""Relay limits and hygiene: rate, connections, timeouts, bad frames, cancellation, fd churn."""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import time

import pytest
from loops import run
from loops import wait_for as wait_until
from relay_helpers import Guest, client_packet, echo_reply, start_fake_upstream
from virtual_time import VirtualTimeLoop, run_virtual

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameType


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_rate_limit_token_bucket(tmp_path):
    """In virtual time (the relay's injected clock): exact refill, however loaded the machine."""
    sock = tmp_path / "r.sock"

    async def main(loop: VirtualTimeLoop) -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), rate_limit=2.0,
                                           rate_burst=3), clock=loop.clock_ns)
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            for rid in range(10):
                guest.request(rid, 0, client_packet())
            frames = [await guest.recv() for _ in range(10)]
            ok = [f.request_id for f in frames if f.type == FrameType.NTP_REPLY]
            limited = [f for f in frames if f.type == FrameType.ERROR]
            assert ok == [0, 1, 2]
            assert all(framing.parse_error(f)[0] == ErrorCode.RATE_LIMITED for f in limited)
            assert relay.stats.errors["rate_limited"] == 7
            await asyncio.sleep(0.45)  # 0.9 of a token back at 2/s: still limited
            guest.request(98, 0, client_packet())
            assert (await guest.recv()).type == FrameType.ERROR
            await asyncio.sleep(0.5)  # now a whole one
            guest.request(99, 0, client_packet())
            assert (await guest.recv()).type == FrameType.NTP_REPLY
            assert relay.stats.errors["rate_limited"] == 8
            await guest.close()
        finally:
            await relay.stop()

    run_virtual(main)


def test_max_connections_refuses_extra_and_recovers(tmp_path):
    sock = tmp_path / "r.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), max_connections=3))
        await relay.start()
        try:
            guests = [await Guest.connect(f"unix:{sock}") for _ in range(3)]
            extra = await Guest.connect(f"unix:{sock}", hello=False)
            frame = await extra.recv()
            assert framing.parse_error(frame)[0] == ErrorCode.BUSY
            assert await extra.closed_by_peer()
            assert relay.stats.connections_refused == 1
            await guests[0].close()
            await wait_until(lambda: relay.stats.connections_open == 2)
            again = await Guest.connect(f"unix:{sock}")
            again.request(1, 0, client_packet())
            assert (await again.recv()).type == FrameType.NTP_REPLY
            for g in [*guests[1:], again, extra]:
                await g.close()
        finally:
            await relay.stop()

    run(main)


def test_holds_1000_idle_guests_with_default_limits(tmp_path):
    sock = tmp_path / "r.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        try:
            guests = await asyncio.gather(*(Guest.connect(f"unix:{sock}") for _ in range(1000)))
            assert relay.stats.connections_open == 1000
            assert relay.stats.connections_refused == 0
            guests[-1].request(1, 0, client_packet())
            assert (await guests[-1].recv()).type == FrameType.NTP_REPLY
        finally:
            await relay.stop()  # closes all of them
        await asyncio.gather(*(g.close() for g in guests))
        assert relay.stats.connections_open == 0

    run(main)


def test_idle_and_hello_timeouts_close_and_count(tmp_path):
    """In virtual time: the deadlines are exact, not 'at least 0.55 s of wall time'."""
    sock = tmp_path / "r.sock"

    async def main(loop: VirtualTimeLoop) -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), idle_timeout_s=0.3,
                                           hello_timeout_s=0.2), clock=loop.clock_ns)
        await relay.start()
        try:
            busy = await Guest.connect(f"unix:{sock}")
            idle = await Guest.connect(f"unix:{sock}")
            mute = await Guest.connect(f"unix:{sock}", hello=False)
            start = loop.time()
            for rid in range(6):  # activity every 0.1 s keeps `busy` open past the idle timeout
                busy.request(rid, 0, client_packet())
                assert (await busy.recv()).type == FrameType.NTP_REPLY
                if rid == 1:  # 0.1 s in: nothing has timed out yet
                    assert relay.stats.errors["hello_timeout"] == 0
                if rid == 2:  # 0.2 s in: the idle guest's 0.3 s deadline is still ahead
                    assert relay.stats.errors["idle_timeout"] == 0
                if rid == 3:  # 0.3 s in: the mute guest's 0.2 s HELLO deadline has passed
                    assert relay.stats.errors["hello_timeout"] == 1
                await asyncio.sleep(0.1)
            assert await idle.closed_by_peer(1.0)
            assert await mute.closed_by_peer(1.0)
            assert loop.time() - start >= 0.6
            busy.request(100, 0, client_packet())
            assert (await busy.recv()).type == FrameType.NTP_REPLY
            assert relay.stats.errors["idle_timeout"] == 1
            assert relay.stats.errors["hello_timeout"] == 1
            for g in (busy, idle, mute):
                await g.close()
        finally:
            await relay.stop()

    run_virtual(main)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (framing.HEADER.pack(1, FrameType.NTP_REQUEST, 300, 1) + b"\0" * 300, "oversized"),
        (framing.HEADER.pack(1, FrameType.NTP_REQUEST, 5000, 1), "oversized"),
        (framing.HEADER.pack(2, FrameType.NTP_REQUEST, 49, 1) + b"\0" * 49, "bad_version"),
        (framing.HEADER.pack(1, 99, 0, 1), "bad_type"),
        (framing.HEADER.pack(1, FrameType.NTP_REQUEST, 0, 1), "bad_payload"),
    ],
)
def test_bad_frames_close_the_connection_and_are_counted(tmp_path, raw, reason):
    sock = tmp_path / "r.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), max_frame_bytes=200))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            guest.writer.write(raw)
            assert await guest.closed_by_peer()
            assert guest.frames and guest.frames[-1].type == FrameType.ERROR
            assert framing.parse_error(guest.frames[-1])[0] == ErrorCode.BAD_FRAME
            assert relay.stats.errors[reason] == 1
            await wait_until(lambda: relay.stats.connections_open == 0)
            await guest.close()
        finally:
            await relay.stop()

    run(main)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (framing.json_frame(FrameType.HELLO, 0, {"version": 2, "name": "future"}),
         "bad_hello_version"),
        (framing.Frame(FrameType.HELLO, 0, b"{not json"), "bad_payload"),
        (framing.ntp_request(1, 0, client_packet()), "no_hello"),
    ],
)
def test_bad_hello_is_refused(tmp_path, first, reason):
    sock = tmp_path / "r.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}", hello=False)
            guest.send(first)
            assert await guest.closed_by_peer()
            assert [f.type for f in guest.frames] == [FrameType.ERROR]
            assert relay.stats.errors[reason] == 1
            await guest.close()
        finally:
            await relay.stop()

    run(main)


def test_upstream_timeout_and_max_pending(tmp_path):
    sock = tmp_path / "r.sock"

    async def main() -> None:
        silent = await start_fake_upstream(reply_for=lambda req: None)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(silent.address,),
                                           upstream_timeout_s=0.2, max_pending=2))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            start = time.monotonic()
            for rid in (1, 2, 3):
                guest.request(rid, 0, client_packet())
            busy = await guest.recv()
            assert busy.request_id == 3 and framing.parse_error(busy)[0] == ErrorCode.BUSY
            timeouts = [await guest.recv(), await guest.recv()]
            assert sorted(f.request_id for f in timeouts) == [1, 2]
            assert all(framing.parse_error(f)[0] == ErrorCode.UPSTREAM_TIMEOUT for f in timeouts)
            assert 0.15 < time.monotonic() - start < 1.0
            assert relay.stats.upstream_timeouts == 2 and relay.stats.errors["busy"] == 1
            assert relay.pending_requests == 0
            await guest.close()
        finally:
            await relay.stop()
            silent.close()

    run(main)


def test_disconnect_cancels_pending_upstream_work(tmp_path):
    sock = tmp_path / "r.sock"

    async def main() -> None:
        held: list[bytes] = []
        silent = await start_fake_upstream(reply_for=lambda req: held.append(req))
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(silent.address,),
                                           upstream_timeout_s=30))
        await relay.start()
        try:
            baseline_tasks = len(asyncio.all_tasks())
            guest = await Guest.connect(f"unix:{sock}")
            for rid in range(10):
                guest.request(rid, 0, client_packet())
            await wait_until(lambda: relay.pending_requests == 10)
            await guest.close()
            await wait_until(lambda: relay.pending_requests == 0 and relay.handler_tasks == 0)
            assert len(asyncio.all_tasks()) == baseline_tasks
            assert relay.stats.upstream_timeouts == 0  # timers were cancelled, not left to fire
            fig = relay.metrics.upstreams[silent.address]
            assert fig.cancelled == 10 and fig.requests == 10  # every request has an outcome
            # the upstream answers late: counted as late (not as forged), nothing written anywhere
            relay_side = relay._upstreams[0].local_address
            for req in held:
                silent.transport.sendto(echo_reply(req), relay_side)
            await wait_until(lambda: relay.stats.upstream_late == 10)
            assert relay.stats.upstream_unsolicited == 0
            assert relay.stats.frames_out.get("NTP_REPLY", 0) == 0
            # a reply nobody ever asked for is still unsolicited
            silent.transport.sendto(echo_reply(client_packet()), relay_side)
            await wait_until(lambda: relay.stats.upstream_unsolicited == 1)
        finally:
            await relay.stop()
            silent.close()

    run(main)


def test_fd_count_unchanged_after_10000_connect_disconnect_cycles(tmp_path):
    sock = str(tmp_path / "r.sock")
    hello = framing.guest_hello("churn").encode()
    request = framing.ntp_request(1, 0, client_packet()).encode()

    async def cycle(i: int) -> None:
        reader, writer = await asyncio.open_unix_connection(sock)
        if i % 3 == 0:
            writer.write(hello + request)  # some do real work, some just vanish
            await reader.read(1)
        elif i % 3 == 1:
            writer.write(hello)
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        try:
            await cycle(0)  # warm-up: lazily created loop resources
            await wait_until(lambda: relay.stats.connections_open == 0)
            gc.collect()  # earlier tests' unreachable sockets must not close mid-count
            before = open_fds()
            start = time.monotonic()
            for batch in range(100):
                await asyncio.gather(*(cycle(batch * 100 + i) for i in range(100)))
            await wait_until(lambda: relay.stats.connections_open == 0, 10)
            elapsed = time.monotonic() - start
            assert open_fds() == before
            assert relay.stats.connections_accepted == 10_001
            assert relay.handler_tasks == 0 and not relay._connections
            print(f"10,000 cycles in {elapsed:.2f} s")
        finally:
            await relay.stop()

    run(main)


def test_struct_sanity_of_raw_frames():
    # guards the raw-frame cases above against a framing header change
    assert framing.HEADER.size == struct.calcsize("!BBHI") == 8
