"""The relay over AF_UNIX: host-clock answers, forwarding, request matching, counters."""

from __future__ import annotations

import asyncio
import time

import ntplib
import pytest
from loops import LOOPS, run
from loops import wait_for as wait_until
from relay_helpers import Guest, client_packet, echo_reply, start_fake_upstream

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameType
from timesyncd.ntptime import unix_ns_to_ntp
from timesyncd.packet import ExtensionField, ExtType, NtpPacket


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_host_clock_mode_answers_valid_ntp(tmp_path, loop_kind):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), local_stratum=7))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            assert guest.hello == {"version": framing.VERSION,
                                   "upstreams": [{"index": 0, "name": "local"}]}
            for rid in (1, 2, 3):
                t1 = time.time_ns()
                request = client_packet(unix_ns_to_ntp(t1))
                guest.request(rid, 0, request)
                frame = await guest.recv()
                t4 = time.time_ns()
                assert (frame.type, frame.request_id) == (FrameType.NTP_REPLY, rid)
                reply, r_in, r_out = framing.parse_ntp_reply(frame)
                stats = ntplib.NTPStats()
                stats.from_data(reply)
                assert stats.stratum == 7 and stats.mode == 4 and stats.leap == 0
                assert reply[24:32] == request[40:48]  # origin echoes our transmit
                assert stats.ref_id == int.from_bytes(b"LOCL", "big")
                t2, t3 = stats.recv_timestamp, stats.tx_timestamp
                offset = ((t2 - t1 / 1e9 - ntplib.NTP.NTP_DELTA) + (t3 - t4 / 1e9
                          - ntplib.NTP.NTP_DELTA)) / 2  # server minus client, ntplib's sign
                assert abs(offset) < 0.005
                assert 0 <= r_in < 5_000_000 and 0 <= r_out < 5_000_000
            assert relay.stats.local_replies == 3
            assert relay.stats.frames_in["NTP_REQUEST"] == 3
            assert relay.stats.frames_out["NTP_REPLY"] == 3
            await guest.close()
        finally:
            await relay.stop()
        assert not sock.exists()

    run(main, loop_kind)


def test_forwards_payload_unchanged_both_ways_with_extension_fields(tmp_path):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        up = await start_fake_upstream()
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(up.address,)))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            assert guest.hello["upstreams"] == [{"index": 0, "name": up.address}]
            efs = (ExtensionField(ExtType.UNIQUE_IDENTIFIER, b"u" * 32),
                   ExtensionField(ExtType.NTS_COOKIE, b"c" * 100))
            request = NtpPacket(transmit_ts=0x1122334455667788, extensions=efs).encode()
            guest.request(0xDEADBEEF, 0, request)
            frame = await guest.recv()
            reply, r_in, r_out = framing.parse_ntp_reply(frame)
            assert frame.request_id == 0xDEADBEEF
            assert up.received == [request]  # bytes identical, extension fields included
            assert reply[24:32] == request[40:48] and reply[48:] == request[48:]
            assert 0 < r_in < 5_000_000 and 0 < r_out < 5_000_000
            assert relay.stats.upstream_requests == relay.stats.upstream_replies == 1
            await guest.close()
        finally:
            await relay.stop()
            up.close()

    run(main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_concurrent_requests_to_two_upstreams_matched_by_request_id(tmp_path, loop_kind):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        slow = await start_fake_upstream(delay_s=0.2)
        fast = await start_fake_upstream()
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(slow.address, fast.address)))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            sent = {}
            for rid in range(1, 21):
                packet = client_packet()
                sent[rid] = packet
                guest.request(rid, rid % 2, packet)  # odd ids to the fast upstream
            got = [await guest.recv() for _ in range(20)]
            order = [f.request_id for f in got]
            assert sorted(order) == list(range(1, 21))
            assert all(rid % 2 == 1 for rid in order[:10])  # the fast upstream answered first
            for frame in got:
                reply, _, _ = framing.parse_ntp_reply(frame)
                assert reply[24:32] == sent[frame.request_id][40:48]
            assert len(slow.received) == len(fast.received) == 10
            await guest.close()
        finally:
            await relay.stop()
            slow.close()
            fast.close()

    run(main, loop_kind)


def test_unknown_upstream_and_non_client_packets_get_errors(tmp_path):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        up = await start_fake_upstream()
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(up.address,)))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            guest.request(5, 1, client_packet())
            code, msg = framing.parse_error(await guest.recv())
            assert code == ErrorCode.UNKNOWN_UPSTREAM and "1" in msg
            server_mode = bytearray(client_packet())
            server_mode[0] = 0x24
            for bad in (b"short", bytes(server_mode), client_packet() + b"x"):
                guest.request(6, 0, bad)
                frame = await guest.recv()
                assert frame.type == FrameType.ERROR and frame.request_id == 6
                assert framing.parse_error(frame)[0] == ErrorCode.BAD_FRAME
            assert up.received == []  # nothing reached the upstream
            assert relay.stats.errors["unknown_upstream"] == 1
            assert relay.stats.errors["bad_packet"] == 3
            guest.request(7, 0, client_packet())  # the connection is still usable
            assert (await guest.recv()).type == FrameType.NTP_REPLY
            await guest.close()
        finally:
            await relay.stop()
            up.close()

    run(main)


def test_unsolicited_and_duplicate_replies_are_dropped_and_counted(tmp_path):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        up = await start_fake_upstream()
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(up.address,)))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            packet = client_packet()
            guest.request(1, 0, packet)
            assert (await guest.recv()).type == FrameType.NTP_REPLY
            # the upstream repeats itself, invents a reply nobody asked for, and sends junk
            relay_side = relay._upstreams[0].local_address
            for junk in (echo_reply(packet), echo_reply(client_packet()), b"tiny"):
                up.transport.sendto(junk, relay_side)
            await wait_until(lambda: relay.stats.upstream_unsolicited == 3)
            with pytest.raises(TimeoutError):
                await guest.recv(timeout=0.1)  # nothing was passed on to the guest
            await guest.close()
        finally:
            await relay.stop()
            up.close()

    run(main)


def test_duplicate_transmit_timestamp_in_flight_is_refused(tmp_path):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        up = await start_fake_upstream(delay_s=0.2)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(up.address,)))
        await relay.start()
        try:
            a = await Guest.connect(f"unix:{sock}")
            b = await Guest.connect(f"unix:{sock}")
            packet = client_packet()
            a.request(1, 0, packet)
            await asyncio.sleep(0.02)
            b.request(1, 0, packet)  # same cookie from another guest: would be ambiguous
            err = await b.recv()
            assert err.type == FrameType.ERROR
            assert framing.parse_error(err)[0] == ErrorCode.UPSTREAM_ERROR
            assert (await a.recv()).type == FrameType.NTP_REPLY
            assert relay.stats.errors["duplicate_transmit"] == 1
            await a.close()
            await b.close()
        finally:
            await relay.stop()
            up.close()

    run(main)


def test_unreachable_upstream_fails_fast(tmp_path):
    sock = tmp_path / "relay.sock"

    async def main() -> None:
        up = await start_fake_upstream()
        dead = up.address
        up.close()  # nothing listens there now: ICMP port unreachable
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(dead,),
                                           upstream_timeout_s=5))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            start = time.monotonic()
            guest.request(1, 0, client_packet())
            frame = await guest.recv()
            assert framing.parse_error(frame)[0] == ErrorCode.UPSTREAM_ERROR
            assert time.monotonic() - start < 1.0
            await guest.close()
        finally:
            await relay.stop()

    run(main)


def test_start_replaces_stale_socket_and_serve_forever_returns_on_stop(tmp_path):
    import socket

    sock = tmp_path / "relay.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}", "tcp:127.0.0.1:0")))
        serving = asyncio.create_task(relay.serve_forever())
        try:
            await wait_until(lambda: len(relay.addresses) == 2)
            tcp = relay.addresses[1]
            assert tcp.kind == "tcp" and tcp.port != 0
            guest = await Guest.connect(str(tcp))
            guest.request(1, 0, client_packet())
            assert (await guest.recv()).type == FrameType.NTP_REPLY
            await relay.stop()
            await asyncio.wait_for(serving, 2)
        finally:
            await relay.stop()  # a no-op once the test stopped it
        assert await guest.closed_by_peer()
        assert not sock.exists()
        assert relay.stats.connections_open == 0

    run(main)


def test_settings_validation_names_the_key():
    with pytest.raises(ValueError, match="upstreams"):
        RelayService(RelaySettings(listen=("unix:/tmp/x",), upstreams=("tcp:127.0.0.1:123",)))
    with pytest.raises(ValueError, match="listen"):
        RelaySettings(listen=("udp:127.0.0.1:1",)).validate()
    with pytest.raises(ValueError, match="socket_mode"):
        RelaySettings(socket_mode="rw-").validate()
