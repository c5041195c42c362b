"""Host text made safe (``timesyncd.text``) and the time floor in the guest's NTS path."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from test_nts_manager_faults import FakeLink
from test_nts_ntp import reply

from guest_client.clocks import SoftwareClock
from guest_client.nts_manager import NtsManager
from guest_client.nts_source import parse_nts_server
from guest_client.relay_link import RelayReply
from guest_client.settings import GuestSettings
from timesyncd import framing
from timesyncd.config import ConfigError, load_settings
from timesyncd.framing import FrameType
from timesyncd.ntptime import unix_ns_to_ntp
from timesyncd.nts.ke_session import NtsKeResult
from timesyncd.packet import NtpPacket
from timesyncd.text import clean_text
from timesyncd.time_floor import TimeFloor


@pytest.mark.parametrize(("raw", "limit", "want"), [
    ("plain text", 160, "plain text"),
    ("line\nforged\r\x00", 160, "line?forged??"),
    ("\x1b[2Jred\u202e\u200b", 160, "?[2Jred??"),
    ("x" * 500, 20, "x" * 17 + "..."),
    ("\ud800lone", 160, "?lone"),
    (b"bytes", 160, ""),
    (None, 160, ""),
])
def test_clean_text(raw: object, limit: int, want: str) -> None:
    assert clean_text(raw, limit) == want


def test_hello_upstream_names_are_cleaned() -> None:
    hello = framing.json_frame(FrameType.HELLO, 0, {"version": framing.VERSION, "upstreams": [
        {"index": 0, "name": "udp:10.0.0.1:123\n2026 CRITICAL forged\x1b[0m" + "y" * 300}]})
    ((_, name),) = framing.parse_relay_hello(hello).upstreams
    assert name.startswith("udp:10.0.0.1:123?2026 CRITICAL forged?[0m")
    assert name.isprintable() and len(name) == 128


def test_time_floor_setting_is_validated_and_names_the_key() -> None:
    base = {"relay": "unix:/r", "clock": "software"}
    assert load_settings(GuestSettings, {**base, "time_floor": "2030-01-01"}).floor().source \
        == "configured"
    with pytest.raises(ConfigError, match="time_floor: .*YYYY-MM-DD"):
        load_settings(GuestSettings, {**base, "time_floor": "soon"})


def test_nts_reply_before_the_time_floor_is_refused() -> None:
    """A verified reply whose server time is before the floor never reaches the controller
    (a server or a stolen key serving old time cannot take the guest back before it)."""
    spec = parse_nts_server("localhost@127.0.0.1")
    errors: list[str] = []
    replies: list[str] = []

    class Link(FakeLink):
        def send(self, upstream: int, packet: bytes, callback: object) -> int:
            self.sent = packet
            return 1

    async def main() -> None:
        keys = (os.urandom(32), os.urandom(32))
        for server_ns, want in ((TimeFloor.build().floor_ns - 10**9, "before_time_floor"),
                                (TimeFloor.build().floor_ns + 10**9, None)):
            m = NtsManager([spec], cafile=None, clock=SoftwareClock(),
                           is_synchronised=lambda: False,
                           on_reply=lambda name, *a: replies.append(name),
                           on_error=lambda n, r: errors.append(r), on_sent=lambda *a: None)
            try:
                link = Link(spec.ke_endpoint)
                m.attach(link)  # type: ignore[arg-type]
                src = m.sources[spec.source_name]
                result = NtsKeResult(15, keys[0], keys[1], (b"c" * 64,) * 8, "127.0.0.1", 123)
                assert src.on_ke_result(result, {"udp:127.0.0.1:123": 0})
                m.send(src.name, NtpPacket(mode=3, transmit_ts=random.getrandbits(64)).encode())
                answer = reply(link.sent, key=keys[1], transmit=unix_ns_to_ntp(server_ns))
                m._on_result(src.name, RelayReply(answer, 0, 0, 0))
                if want:
                    assert errors[-1] == want and src.counters[want] == 1 and not replies
                else:
                    assert replies == [src.name]
            finally:
                await m.stop()

    asyncio.run(main())


def test_plain_source_cannot_take_the_clock_before_the_floor() -> None:
    """A plain server (or the host) answering 20 years in the past at first boot. Before the
    fix the guest stepped its clock back 20 years; now every such reply is refused."""
    import time

    from guest_fakes import start_fake_upstream
    from loops import wait_for

    from guest_client.clocks import SoftwareClock
    from guest_client.daemon import GuestDaemon
    from timesyncd.server import build_server_reply

    past = 20 * 365 * 86400 * 10**9

    def old_reply(request: bytes) -> bytes:
        now = time.time_ns() - past
        return build_server_reply(request, now, now, stratum=2, reference_id=b"OLD\0",
                                  reference_ns=now - 10**9)

    async def main() -> None:
        ntp = await start_fake_upstream(reply_for=old_reply)
        settings = GuestSettings(servers=(ntp.address,), clock="software", status_socket="",
                                 minpoll=-3, maxpoll=-3, health_interval_s=0)
        clock = SoftwareClock()
        daemon = GuestDaemon(settings, clock, rng=random.Random(3))
        await daemon.start()
        try:
            await wait_for(lambda: daemon.status()["rejected"].get("before_time_floor", 0) >= 4,
                           5, "refusals")
            assert not clock.steps and daemon.controller.state == "unsynchronised"
            assert daemon.status()["daemon_errors"]["before_time_floor"] >= 4
            assert daemon.status()["time_floor"] == {
                "date": TimeFloor.build().datetime.isoformat(), "source": "release"}
        finally:
            await daemon.stop()
            ntp.close()

    asyncio.run(main())
