"""The relay against a real chronyd on loopback (and the fixture that provides it)."""

from __future__ import annotations

import os

import ntplib
from chrony_fixture import chrony_server, chronyd  # noqa: F401 - pytest fixture


def test_fixture_serves_time_from_its_own_process(chrony_server):  # noqa: F811
    stats = ntplib.NTPClient().request(chrony_server.host, port=chrony_server.port, timeout=2)
    assert stats.stratum == chrony_server.stratum
    assert abs(stats.offset) < 0.05  # same host clock
    assert os.path.exists(f"/proc/{chrony_server.pid}")


def test_fixture_stops_chronyd_and_cleans_up():
    with chronyd(stratum=9) as server:
        stats = ntplib.NTPClient().request(server.host, port=server.port, timeout=2)
        assert stats.stratum == 9
        pid, workdir = server.pid, server.workdir
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    assert not workdir.exists()




def test_relay_returns_chronyd_reply_unchanged(chrony_server, tmp_path):  # noqa: F811
    import asyncio
    import statistics
    import time

    from relay_helpers import Guest, client_packet

    from host_relay.service import RelayService
    from host_relay.settings import RelaySettings
    from timesyncd import framing
    from timesyncd.framing import FrameType
    from timesyncd.ntptime import ntp_to_unix_ns, unix_ns_to_ntp

    sock = tmp_path / "relay.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(chrony_server.address,),
                                           rate_limit=1000.0, rate_burst=100))
        upstream = relay._upstreams[0]
        seen: list[bytes] = []
        deliver = upstream._on_datagram

        def tap(data: bytes, rx_ns: int) -> None:  # what arrived from chronyd, untouched
            seen.append(bytes(data))
            deliver(data, rx_ns)

        upstream._on_datagram = tap  # type: ignore[method-assign]
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            assert guest.hello["upstreams"] == [{"index": 0, "name": chrony_server.address}]
            rtts, residences, offsets = [], [], []
            for rid in range(50):
                t1 = time.time_ns()
                request = client_packet(unix_ns_to_ntp(t1))
                guest.request(rid, 0, request)
                frame = await guest.recv()
                t4 = time.time_ns()
                assert frame.type == FrameType.NTP_REPLY and frame.request_id == rid
                reply, r_in, r_out = framing.parse_ntp_reply(frame)
                assert reply == seen[-1]  # byte for byte what chronyd sent
                stats = ntplib.NTPStats()
                stats.from_data(reply)
                assert stats.stratum == chrony_server.stratum and stats.mode == 4
                assert reply[24:32] == request[40:48]
                t2 = ntp_to_unix_ns(int.from_bytes(reply[32:40], "big"), t1)
                t3 = ntp_to_unix_ns(int.from_bytes(reply[40:48], "big"), t1)
                offset = ((t1 - t2) + (t4 - t3)) / 2e9  # guest minus server
                delay = ((t4 - t1) - (t3 - t2)) / 1e9
                # guest and chronyd read the same machine clock, so each offset is pure path
                # asymmetry: never more than half the round trip (plus timestamp rounding),
                # however long a loaded machine kept either process off the CPU
                assert abs(offset) <= delay / 2 + 2e-6, (offset, delay)
                offsets.append(offset)
                rtts.append((t4 - t1) / 1e3)
                residences.append((r_in + r_out) / 1e3)
            assert len(seen) == 50
            assert statistics.median(abs(o) for o in offsets) < 0.0005
            assert statistics.median(residences) < 2000
            print(f"\nvia relay to chronyd: median rtt {statistics.median(rtts):.0f} us, "
                  f"median relay residence {statistics.median(residences):.0f} us, "
                  f"max |offset| {max(abs(o) for o in offsets) * 1e6:.0f} us")
            await guest.close()
        finally:
            await relay.stop()

    asyncio.run(main())
