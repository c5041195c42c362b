"""A guest can send the relay anything: what it sends is refused and counted, and it can
neither crash the relay, break the metrics everybody else relies on, nor flood its log."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from relay_helpers import Guest, client_packet, start_fake_upstream

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import FrameType
from timesyncd.health import HealthError, parse_health

pytestmark = pytest.mark.timeout(60)


def health(**extra: object) -> framing.Frame:
    return framing.Frame(FrameType.HEALTH, 0, json.dumps(
        {"version": 1, "state": "synchronised", **extra}).encode())


@pytest.mark.parametrize("field,value", [
    ("offset_s", 10**400), ("steps", 10**400), ("refused_jumps", 2**53),
])
def test_numbers_beyond_float_range_are_a_bad_field(field: str, value: int) -> None:
    payload = json.dumps({"version": 1, "state": "synchronised", field: value}).encode()
    with pytest.raises(HealthError) as err:
        parse_health(payload)
    assert err.value.reason == "bad_field"


def test_huge_numbers_and_odd_names_cannot_crash_or_break_metrics() -> None:
    async def main() -> None:
        svc = RelayService(RelaySettings(listen=("tcp:127.0.0.1:0",)))
        await svc.start()
        try:
            addr = str(svc.addresses[0])
            g = await Guest.connect(addr)
            g.send(health(offset_s=10**400))
            g.send(health(rejected={"x": 10**400}))
            odd = await Guest.connect(addr, name="a\ud800b\x1b[31m\u202ec")
            odd.send(health(offset_s=0.001))
            await asyncio.sleep(0.3)
            assert svc.stats.errors["health_bad_field"] == 1
            assert svc.stats.connections_open == 2  # refused reports, not dropped connections
            text = svc.render_metrics().decode()  # raised on the surrogate before
            assert 'name="ab[31mc"' in text and "timesync_guest_offset_seconds" in text
            assert json.dumps(svc.status())  # /status renders too
            await g.close()
            await odd.close()
        finally:
            await svc.stop()

    asyncio.run(main())


def test_health_flood_is_cut_off_and_logged_a_few_times(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[int, bool, int]:
        svc = RelayService(RelaySettings(listen=("tcp:127.0.0.1:0",)))
        await svc.start()
        try:
            g = await Guest.connect(str(svc.addresses[0]))
            g.writer.write(framing.Frame(FrameType.HEALTH, 0, b"").encode() * 10_000)
            await g.closed_by_peer(5.0)  # EOF or a reset: the relay dropped unread frames
            await asyncio.sleep(0.1)
            closed = svc.stats.connections_open == 0
            return svc.stats.frames_in["HEALTH"], closed, svc.stats.errors["frame_flood"]
        finally:
            await svc.stop()

    with caplog.at_level(logging.WARNING):
        received, closed, floods = asyncio.run(main())
    assert closed and floods == 1
    assert received < 1000  # 8 x rate_burst + 256 = 512 frames of credit
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 4, [r.getMessage() for r in warnings]  # 1st, 10th, 100th


def test_normal_guest_traffic_is_nowhere_near_the_flood_limit() -> None:
    async def main() -> None:
        svc = RelayService(RelaySettings(listen=("tcp:127.0.0.1:0",), rate_limit=16,
                                         rate_burst=32))
        await svc.start()
        try:
            g = await Guest.connect(str(svc.addresses[0]))
            for rid in range(32):  # a full burst of requests, then health reports
                g.request(rid, 0, client_packet())
            for _ in range(5):
                g.send(health(offset_s=0.0))
            replies = [await g.recv() for _ in range(32)]
            assert all(f.type == FrameType.NTP_REPLY for f in replies)
            assert svc.stats.errors["frame_flood"] == 0 and svc.stats.connections_open == 1
            await g.close()
        finally:
            await svc.stop()

    asyncio.run(main())


def test_hello_too_big_for_a_frame_is_a_config_error() -> None:
    ups = tuple(f"udp:127.0.0.1:{20000 + i}" for i in range(120))
    with pytest.raises(ValueError, match="upstreams, nts_ke_servers: .* over the 4096-byte"):
        RelaySettings(listen=("tcp:127.0.0.1:0",), upstreams=ups).validate()


def test_disconnect_counts_cancelled_work_and_ke_counters_are_exported() -> None:
    async def main() -> None:
        up = await start_fake_upstream(delay_s=0.3)
        ke = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = ke.sockets[0].getsockname()[1]
        svc = RelayService(RelaySettings(listen=("tcp:127.0.0.1:0",), upstreams=(up.address,),
                                         nts_ke_servers=(f"tcp:127.0.0.1:{port}",)))
        await svc.start()
        try:
            g = await Guest.connect(str(svc.addresses[0]))
            for rid in range(3):
                g.request(rid, 0, client_packet())
            g.send(framing.stream_open(9, 0))
            await asyncio.sleep(0.1)
            await g.close()
            await asyncio.sleep(0.5)
            fig = svc.metrics.upstreams[up.address]
            assert (fig.requests, fig.cancelled, svc.pending_requests) == (3, 3, 0)
            assert svc.stats.upstream_late == 3 and svc.stats.upstream_unsolicited == 0
            assert svc.ke_proxy.counters["guest_disconnected"] == 1
            text = svc.render_metrics().decode()
            assert 'timesync_relay_nts_ke_streams_total{event="guest_disconnected"} 1.0' in text
            cancelled = ('timesync_relay_upstream_cancelled_total{source_address="' + up.address
                         + '"} 3.0')
            assert cancelled in text
            assert svc.status()["nts_ke"]["opened"] == 1
        finally:
            await svc.stop()
            ke.close()
            up.close()

    asyncio.run(main())


def test_one_guest_cannot_hold_every_connection_slot() -> None:
    async def main() -> None:
        svc = RelayService(RelaySettings(listen=("tcp:127.0.0.1:0",), max_connections=100,
                                         max_connections_per_guest=2))
        await svc.start()
        try:
            addr = str(svc.addresses[0])
            held = [await Guest.connect(addr), await Guest.connect(addr)]
            third = await Guest.connect(addr, hello=False)
            refused = await third.recv()
            assert refused.type == FrameType.ERROR
            assert await third.closed_by_peer()
            assert svc.stats.errors["per_guest_limit"] == 1
            await held[0].close()  # a slot freed is a slot again
            await asyncio.sleep(0.1)
            again = await Guest.connect(addr)
            again.request(1, 0, client_packet())
            assert (await again.recv()).type == FrameType.NTP_REPLY
            for g in (held[1], again, third):
                await g.close()
        finally:
            await svc.stop()

    asyncio.run(main())


def test_a_firecracker_socket_is_one_guest_a_plain_unix_socket_is_not(tmp_path) -> None:
    async def main() -> None:
        fc_path, unix_path = tmp_path / "v.sock", tmp_path / "local.sock"
        svc = RelayService(RelaySettings(listen=(f"fc:{fc_path}:123", f"unix:{unix_path}"),
                                         max_connections_per_guest=1))
        await svc.start()
        try:
            first = await Guest.connect(f"unix:{fc_path}_123")
            second = await Guest.connect(f"unix:{fc_path}_123", hello=False)
            assert (await second.recv()).type == FrameType.ERROR  # the same microVM
            locals_ = [await Guest.connect(f"unix:{unix_path}") for _ in range(3)]
            assert svc.stats.errors["per_guest_limit"] == 1 and len(svc.guests) == 4
            for g in (first, second, *locals_):
                await g.close()
        finally:
            await svc.stop()

    asyncio.run(main())


def test_metrics_stop_ends_requests_in_progress() -> None:
    from host_relay.metrics_http import MetricsServer

    async def main() -> None:
        server = MetricsServer("tcp:127.0.0.1:0", lambda: b"", dict)
        await server.start()
        try:
            host, port = server.bound.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /metr")  # an idle client, mid-request
            await asyncio.sleep(0.1)
            listener = server._listener
            assert listener is not None and listener.handlers is not None
            assert len(listener.handlers.tasks) == 1
            errors: list[dict[str, object]] = []
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
            await asyncio.wait_for(server.stop(), 3.0)
            assert not listener.handlers.tasks
            await asyncio.sleep(0.05)
            assert errors == []  # no "Exception in callback" for the cancelled handler
            assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed, no late answer
            writer.close()
        finally:
            await server.stop()  # a no-op once the test stopped it

    asyncio.run(main())


def test_a_frame_the_relay_cannot_encode_is_counted_not_silently_lost() -> None:
    from host_relay.connection import ConnectionLimits, GuestConnection
    from host_relay.stats import RelayStats

    class Owner:
        def accept(self, conn: object) -> bool:
            return True

    stats = RelayStats()
    conn = GuestConnection(Owner(), stats, ConnectionLimits(4096, 10**9, 10**9, 16.0, 32))  # type: ignore[arg-type]
    conn.send_frame(framing.Frame(FrameType.HELLO, 0, b"x" * (framing.MAX_PAYLOAD + 1)))
    assert stats.errors["unsendable_frame"] == 1 and not stats.frames_out


def test_upstream_failures_are_logged_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    """The 1st and 10th failure in a row are logged; a reply ends the episode, so the next
    outage is logged again from its first failure (lifetime counts would hide it)."""
    from relay_helpers import echo_reply

    answering = {"on": False}

    async def main() -> None:
        up = await start_fake_upstream(
            reply_for=lambda req: echo_reply(req) if answering["on"] else None)
        svc = RelayService(RelaySettings(listen=("tcp:127.0.0.1:0",), upstreams=(up.address,),
                                         upstream_timeout_s=0.02))
        await svc.start()
        try:
            g = await Guest.connect(str(svc.addresses[0]))

            async def exchange(rid: int) -> FrameType:
                g.request(rid, 0, client_packet())
                return FrameType((await g.recv()).type)

            assert [await exchange(i) for i in range(12)] == [FrameType.ERROR] * 12
            answering["on"] = True
            assert await exchange(12) == FrameType.NTP_REPLY
            answering["on"] = False
            assert await exchange(13) == FrameType.ERROR
            await g.close()
        finally:
            await svc.stop()
            up.close()

    with caplog.at_level(logging.WARNING, logger="host_relay.service"):
        asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if "request failed" in r.getMessage()]
    assert [m.split("; ")[1] for m in logged] == ["1 in a row)", "10 in a row)", "1 in a row)"]
