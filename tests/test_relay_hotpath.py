"""The relay's fast path: frame cutting in data_received, reply encoding, the upstream timeout
sweep, socket buffers for bursts of replies, and slow readers."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from loops import LOOPS, run
from loops import wait_for as wait_until
from relay_helpers import Guest, client_packet, echo_reply, start_fake_upstream

from host_relay.connection import MAX_WRITE_BUFFER, REPLY_HEAD
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from host_relay.stats import RelayStats
from host_relay.upstream import SOCKET_BUFFER_BYTES, Upstream
from timesyncd import framing
from timesyncd.addresses import parse_address
from timesyncd.framing import ErrorCode, FrameType


def test_reply_head_encodes_like_framing():
    packet = bytes(range(48))
    for r_in, r_out in ((0, 0), (123, 456_789), (0xFFFF_FFFF, 1)):
        fast = REPLY_HEAD.pack(framing.VERSION, FrameType.NTP_REPLY, 8 + len(packet), 77,
                               r_in, r_out) + packet
        assert fast == framing.ntp_reply(77, packet, r_in, r_out).encode()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_frames_split_and_coalesced_arbitrarily(tmp_path, loop_kind):
    """Requests dribbled one byte per write and 50 coalesced in one write are all answered."""
    sock = tmp_path / "r.sock"

    async def main() -> None:
        upstream = await start_fake_upstream()
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(upstream.address,), rate_burst=1000))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            raw = framing.ntp_request(1, 0, client_packet()).encode()
            for i in range(len(raw)):
                guest.writer.write(raw[i:i + 1])
                await guest.writer.drain()
                await asyncio.sleep(0)
            frame = await guest.recv()
            assert (frame.type, frame.request_id) == (FrameType.NTP_REPLY, 1)
            burst = b"".join(framing.ntp_request(rid, 0, client_packet()).encode()
                             for rid in range(100, 150))
            guest.writer.write(burst[:-30])  # the last frame straddles two writes
            await asyncio.sleep(0.01)
            guest.writer.write(burst[-30:])
            replies = [await guest.recv() for _ in range(50)]
            assert sorted(f.request_id for f in replies) == list(range(100, 150))
            assert all(f.type == FrameType.NTP_REPLY for f in replies)
            for f in replies:
                _, r_in, r_out = framing.parse_ntp_reply(f)
                assert 0 <= r_in < 1_000_000_000 and 0 <= r_out < 1_000_000_000
            assert relay.stats.frames_in["NTP_REQUEST"] == 51
            assert relay.stats.frames_out["NTP_REPLY"] == 51
            assert relay.metrics.residence.count == 51
            await guest.close()
        finally:
            await relay.stop()
            upstream.close()

    run(main, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_1000_replies_arriving_at_once_are_all_delivered(tmp_path, loop_kind):
    """Guests polling in step: the upstream answers 1000 requests in one burst. The default
    ~208 KiB receive buffer holds about 270 of them; the relay's enlarged one holds all."""
    sock = tmp_path / "r.sock"
    n = 1000

    async def main() -> None:
        upstream = await start_fake_upstream(reply_for=lambda req: None)
        assert upstream.transport is not None  # it must hold the 1000 requests itself
        upstream.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(upstream.address,), max_pending=n,
                                           rate_burst=n, upstream_timeout_s=5.0))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            guest.writer.write(b"".join(framing.ntp_request(rid, 0, client_packet()).encode()
                                        for rid in range(n)))
            await wait_until(lambda: len(upstream.received) == n)
            relay_side = relay._upstreams[0].local_address
            for req in upstream.received:  # all sent before the relay's loop can read any
                upstream.transport.sendto(echo_reply(req), relay_side)
            replies = [await guest.recv(timeout=5.0) for _ in range(n)]
            assert sorted(f.request_id for f in replies) == list(range(n))
            assert all(f.type == FrameType.NTP_REPLY for f in replies)
            assert relay.stats.upstream_timeouts == 0
            assert relay.stats.upstream_replies == n
            await guest.close()
        finally:
            await relay.stop()
            upstream.close()

    run(main, loop_kind)


def test_upstream_socket_buffers_are_enlarged():
    async def main() -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        address = parse_address(f"udp:127.0.0.1:{server.getsockname()[1]}")

        def ignore(*_: object) -> None:
            pass

        plain = Upstream(0, address, RelayStats(), 1.0, ignore, buffer_bytes=0)
        big = Upstream(1, address, RelayStats(), 1.0, ignore)  # the relay's default
        await plain.open()
        await big.open()
        try:
            rcv, snd = big.buffer_sizes
            # root (CAP_NET_ADMIN) or a high enough rmem_max grants it; Linux reports double
            assert rcv >= SOCKET_BUFFER_BYTES and snd >= SOCKET_BUFFER_BYTES
            assert plain.buffer_sizes[0] < rcv
        finally:
            plain.close()
            big.close()
            server.close()

    asyncio.run(main())


def test_timeouts_expire_in_order_while_others_are_answered(tmp_path):
    """One sweep timer serves all requests: answered ones leave the queue, the rest expire on
    time, and requests sent later are not expired early."""
    sock = tmp_path / "r.sock"

    async def main() -> None:
        answer = {"on": False}
        upstream = await start_fake_upstream(
            reply_for=lambda req: echo_reply(req) if answer["on"] else None)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(upstream.address,), upstream_timeout_s=0.3))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            start = time.monotonic()
            guest.request(1, 0, client_packet())  # never answered
            await asyncio.sleep(0.15)
            answer["on"] = True
            guest.request(2, 0, client_packet())  # answered at once
            first = await guest.recv()
            assert (first.type, first.request_id) == (FrameType.NTP_REPLY, 2)
            answer["on"] = False
            guest.request(3, 0, client_packet())  # never answered, sent ~0.15 s after 1
            second = await guest.recv()
            assert second.request_id == 1
            assert framing.parse_error(second)[0] == ErrorCode.UPSTREAM_TIMEOUT
            assert 0.25 < time.monotonic() - start < 0.45
            third = await guest.recv()
            assert third.request_id == 3
            assert framing.parse_error(third)[0] == ErrorCode.UPSTREAM_TIMEOUT
            assert 0.4 < time.monotonic() - start < 0.8
            assert relay.stats.upstream_timeouts == 2 and relay.pending_requests == 0
            await guest.close()
        finally:
            await relay.stop()
            upstream.close()

    asyncio.run(main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_guest_that_never_reads_is_dropped(tmp_path, loop_kind):
    """Replies pile up for a guest that stops reading: past the write-buffer limit the relay
    aborts the connection and counts it, instead of buffering without bound."""
    path = str(tmp_path / "r.sock")

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{path}",), rate_limit=1e6,
                                           rate_burst=1_000_000, max_pending=65536))
        await relay.start()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(path)
            raw.setblocking(False)
            loop = asyncio.get_running_loop()
            hello = framing.guest_hello("mute")
            await loop.sock_sendall(raw, hello.encode())
            request = framing.ntp_request(1, 0, client_packet()).encode()
            batch = request * 200
            sent = 0
            # replies are 64 bytes: enough requests to overflow the limit plus socket buffers
            while relay.stats.errors["slow_reader"] == 0 and sent < 3 * MAX_WRITE_BUFFER:
                try:
                    await asyncio.wait_for(loop.sock_sendall(raw, batch), 1.0)
                except (TimeoutError, OSError):
                    break
                sent += len(batch)
            await wait_until(lambda: relay.stats.errors["slow_reader"] == 1)
            await wait_until(lambda: relay.stats.connections_open == 0)
        finally:
            raw.close()
            await relay.stop()

    run(main, loop_kind)
