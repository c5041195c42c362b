"""Upstream faults the relay must recover from by itself, under both event loops.

uvloop stops calling a UDP socket's reader after one error on it (an ICMP port unreachable
while the upstream restarts) and never delivers that socket's datagrams again; the relay
replaces the socket, repairs a reader that died anyway, and follows a name to a new address.
Every test also checks the accounting identity (see ``accounting``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from loops import LOOPS, run
from relay_helpers import FakeUpstream, Guest, client_packet

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameType


async def fake_upstream_on(host: str, port: int) -> FakeUpstream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(FakeUpstream, local_addr=(host, port))
    return proto


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accounting(relay: RelayService) -> dict[str, Any]:
    """Every request sent (or tried) upstream ends as exactly one outcome or is in flight."""
    out = {}
    for up in relay.status()["upstreams"]:
        ended = up["replies"] + up["timeouts"] + up["cancelled"] + sum(up["errors"].values())
        assert up["requests"] == ended + up["in_flight"], up
        out[up["name"]] = up
    return out


async def exchange(guest: Guest, rid: int, timeout: float = 3.0) -> framing.Frame:
    guest.request(rid, 0, client_packet())
    return await guest.recv(timeout)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_upstream_restarted_on_its_port_is_used_again(tmp_path, loop_kind, caplog):
    sock = tmp_path / "relay.sock"
    port = free_port()

    async def main() -> None:
        up = await fake_upstream_on("127.0.0.1", port)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(f"udp:127.0.0.1:{port}",),
                                           upstream_timeout_s=0.5))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            assert (await exchange(guest, 1)).type == FrameType.NTP_REPLY
            up.close()  # the upstream stops: ICMP port unreachable from now on
            for rid in range(2, 12):  # enough failures to empty the reach register
                frame = await exchange(guest, rid)
                assert frame.type == FrameType.ERROR
            st = accounting(relay)[f"udp:127.0.0.1:{port}"]
            assert st["reachable"] is False and st["reach"] == "000"
            up = await fake_upstream_on("127.0.0.1", port)  # back on the same port
            frame = await exchange(guest, 20)
            assert frame.type == FrameType.NTP_REPLY, framing.parse_error(frame)
            for rid in range(21, 25):
                assert (await exchange(guest, rid)).type == FrameType.NTP_REPLY
            st = accounting(relay)[f"udp:127.0.0.1:{port}"]
            assert st["reachable"] is True and st["reach"] == "037" and st["last_reply_age_s"] < 1
            assert relay.stats.upstream_reopens >= 1
            body = relay.render_metrics().decode()
            label = f'{{source_address="udp:127.0.0.1:{port}"}}'
            assert f"timesync_relay_upstream_reachable{label} 1.0" in body
            assert f"timesync_relay_upstream_reach_ratio{label} 0.625" in body
            assert f"timesync_relay_upstream_last_reply_age_seconds{label} " in body
            await guest.close()
        finally:
            await relay.stop()
            up.close()

    with caplog.at_level(logging.INFO, logger="host_relay"):
        run(main, loop_kind)
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", "") in
             ("upstream_unreachable", "upstream_reachable")]
    assert len(lines) == 2 and "unreachable" in lines[0] and "reachable again" in lines[1], lines


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_reader_that_stopped_firing_is_repaired_once(tmp_path, loop_kind, caplog):
    sock = tmp_path / "relay.sock"
    port = free_port()

    async def main() -> None:
        up = await fake_upstream_on("127.0.0.1", port)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(f"udp:127.0.0.1:{port}",),
                                           upstream_timeout_s=0.3))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            assert (await exchange(guest, 1)).type == FrameType.NTP_REPLY
            upstream = relay._upstreams[0]
            # what uvloop does after an error: the loop silently stops watching the socket
            asyncio.get_running_loop().remove_reader(upstream._sock.fileno())
            frame = await exchange(guest, 2)  # the reply waits unread, the request times out
            assert framing.parse_error(frame)[0] == ErrorCode.UPSTREAM_TIMEOUT
            assert relay.stats.upstream_reader_repairs == 1
            for rid in range(3, 8):
                assert (await exchange(guest, rid)).type == FrameType.NTP_REPLY
            assert relay.stats.upstream_late == 1  # the reply that waited, read at the repair
            accounting(relay)
            await guest.close()
        finally:
            await relay.stop()
            up.close()

    with caplog.at_level(logging.WARNING, logger="host_relay"):
        run(main, loop_kind)
    stalls = [r for r in caplog.records if getattr(r, "event", "") == "upstream_reader_stalled"]
    assert len(stalls) == 1


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_name_that_moves_to_a_new_address_is_followed(tmp_path, loop_kind):
    sock = tmp_path / "relay.sock"
    old_port, new_port = free_port(), free_port("127.0.0.2")

    async def main() -> None:
        old = await fake_upstream_on("127.0.0.1", old_port)
        new = await fake_upstream_on("127.0.0.2", new_port)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(f"udp:ntp.test:{old_port}",),
                                           upstream_timeout_s=0.3))
        upstream = relay._upstreams[0]
        where = {"target": (socket.AF_INET, 17, ("127.0.0.1", old_port))}
        lookups = []

        async def resolve() -> tuple[int, int, Any]:  # a DNS we control: the name moves
            lookups.append(where["target"])
            return where["target"]

        upstream._resolve = resolve  # type: ignore[method-assign]
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            assert (await exchange(guest, 1)).type == FrameType.NTP_REPLY
            assert len(old.received) == 1
            where["target"] = (socket.AF_INET, 17, ("127.0.0.2", new_port))
            old.reply_for = lambda _: None  # the old address goes silent (no ICMP either)
            replies = 0
            for rid in range(2, 12):
                frame = await exchange(guest, rid)
                if frame.type == FrameType.NTP_REPLY:
                    replies += 1
            assert replies >= 5 and len(new.received) == replies
            assert len(lookups) >= 2
            accounting(relay)
            await guest.close()
        finally:
            await relay.stop()
            old.close()
            new.close()

    run(main, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_requests_queued_while_the_loop_stood_still_are_stale_not_forwarded(tmp_path,
                                                                           loop_kind):
    import json
    import threading
    import time

    sock = tmp_path / "relay.sock"
    port = free_port()
    health = framing.Frame(FrameType.HEALTH, 0, json.dumps(
        {"version": 1, "state": "synchronised"}).encode()).encode()

    async def main() -> None:
        up = await fake_upstream_on("127.0.0.1", port)
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(f"udp:127.0.0.1:{port}",),
                                           stale_request_s=0.5))
        await relay.start()
        raw = socket.socket(socket.AF_UNIX)  # a guest in another thread: it runs on
        try:
            raw.connect(str(sock))
            raw.sendall(framing.json_frame(FrameType.HELLO, 0,
                                           {"version": framing.VERSION, "name": "t"}).encode())
            decoder = framing.FrameDecoder()
            await asyncio.sleep(0.3)
            raw.setblocking(True)
            assert decoder.feed(raw.recv(65536))[0].type == FrameType.HELLO

            def guest_meanwhile() -> None:  # while the relay's loop is frozen
                time.sleep(0.2)
                for rid in (1, 2):
                    raw.sendall(framing.ntp_request(rid, 0, client_packet()).encode())
                raw.sendall(health * 7)  # more than the report burst (5)

            thread = threading.Thread(target=guest_meanwhile)
            thread.start()
            time.sleep(1.2)  # the loop stands still (what SIGSTOP or a frozen host does)
            thread.join()
            await asyncio.sleep(0.3)
            raw.settimeout(2)
            frames = decoder.feed(raw.recv(65536))
            assert [(f.request_id, framing.parse_error(f)[0]) for f in frames] == [
                (1, ErrorCode.UPSTREAM_TIMEOUT), (2, ErrorCode.UPSTREAM_TIMEOUT)]
            assert up.received == [] and relay.stats.stale_requests == 2
            assert relay.stats.errors["health_rate_limited"] == 0
            assert relay.guests.records()[0].reports == 7
            raw.sendall(framing.ntp_request(3, 0, client_packet()).encode())  # fresh: forwarded
            await asyncio.sleep(0.3)
            frame = decoder.feed(raw.recv(65536))[0]
            assert (frame.type, frame.request_id) == (FrameType.NTP_REPLY, 3)
            accounting(relay)
        finally:
            raw.close()
            await relay.stop()
            up.close()

    run(main, loop_kind)
