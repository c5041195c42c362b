"""Guest settings, relay link and the daemon's driving of the controller (fake relay)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from guest_fakes import FakeRelay, start_ntp_server
from loops import wait_for

from guest_client.actions import (
    Action,
    ControllerStatus,
    SendRequest,
    SetFrequency,
    SetKernelStatus,
    StepClock,
)
from guest_client.clocks import SoftwareClock
from guest_client.controller import SourceConfig
from guest_client.daemon import GuestDaemon, make_clock
from guest_client.relay_link import RelayFailure, RelayLink, RelayReply, Upstream
from guest_client.settings import GuestSettings
from guest_client.status_server import query_status
from guest_client.tracking import Tracking
from timesyncd import framing
from timesyncd.clock import KernelStatus
from timesyncd.config import ConfigError, load_settings
from timesyncd.discipline import DisciplineConfig

# --- settings --------------------------------------------------------------------------------


def test_settings_clock_must_be_explicit() -> None:
    with pytest.raises(ConfigError, match="explicit choice"):
        load_settings(GuestSettings, {"relay": "unix:/tmp/r.sock"})
    s = load_settings(GuestSettings, {"relay": "unix:/tmp/r.sock", "clock": "software"})
    assert s.clock == "software"
    with pytest.raises(ConfigError, match="clock"):
        load_settings(GuestSettings, {"relay": "unix:/r", "clock": "hardware"})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"clock": "software"}, "no time source"),
        ({"clock": "software", "relay": "udp:127.0.0.1:123"}, "UDP address"),
        ({"clock": "software", "servers": ["unix:/x"]}, "not udp:HOST:PORT"),
        ({"clock": "software", "relay": "bogus"}, "relay:"),
        ({"clock": "system", "relay": "unix:/r", "forward_ntp": "udp:127.0.0.1:1123"}, "fight"),
        ({"clock": "software", "servers": ["udp:127.0.0.1:123"],
          "forward_ntp": "udp:127.0.0.1:1123"}, "needs --relay"),
        ({"clock": "software", "relay": "unix:/r", "minpoll": 6, "maxpoll": 4}, "minpoll"),
        ({"clock": "software", "relay": "unix:/r", "status_socket_mode": "rw"}, "octal"),
    ],
)
def test_settings_cross_field_rules(values: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(GuestSettings, values)


def test_settings_mirror_every_discipline_field() -> None:
    ours = {f.name: f for f in dataclasses.fields(GuestSettings)}
    for f in dataclasses.fields(DisciplineConfig):
        assert f.name in ours, f"GuestSettings lacks discipline field {f.name}"
        assert ours[f.name].default == f.default
    s = GuestSettings(relay="unix:/r", clock="software", minpoll=0, maxpoll=3, step_limit=5)
    cfg = s.discipline_config()
    assert (cfg.minpoll, cfg.maxpoll, cfg.step_limit) == (0, 3, 5)


def test_make_clock_software() -> None:
    clock = make_clock(GuestSettings(relay="unix:/r", clock="software", software_freq_ppm=50.0,
                                     software_offset_s=2.0))
    assert isinstance(clock, SoftwareClock)
    assert abs(clock.true_offset_ns() - 2_000_000_000) < 10_000_000
    with pytest.raises(ValueError):
        make_clock(GuestSettings(relay="unix:/r"))


# --- relay link ------------------------------------------------------------------------------




def test_relay_link_hello_requests_errors_and_reconnect() -> None:
    from timesyncd.packet import NtpPacket

    ups: list[list[Upstream]] = []
    downs: list[str] = []
    results: list[RelayReply | RelayFailure] = []

    async def main() -> None:
        relay = FakeRelay(upstreams=["udp:10.0.0.1:123", "local"])
        await relay.start()
        link = RelayLink(relay.address, "guest-a", rx_clock=time.time_ns, on_up=ups.append,
                         on_down=downs.append, reconnect_min_s=0.05, reconnect_max_s=0.2)
        assert link.send(0, b"x", results.append) is None  # not connected: refused, counted
        assert link.counters["send_not_connected"] == 1
        await link.start()
        try:
            await wait_for(lambda: link.connected)
            assert relay.hellos == [
                {"version": framing.VERSION, "name": "guest-a", "request_timeout_s": 5.0}]
            assert ups == [[Upstream(0, "udp:10.0.0.1:123"), Upstream(1, "local")]]
            req = NtpPacket(transmit_ts=12345).encode()
            before = time.time_ns()
            assert link.send(1, req, results.append) is not None
            await wait_for(lambda: len(results) == 1)
            reply = results[0]
            assert isinstance(reply, RelayReply)
            assert (reply.residence_in_ns, reply.residence_out_ns) == (1000, 2000)
            assert before <= reply.rx_ns <= time.time_ns()
            relay.mode = "error"
            link.send(1, req, results.append)
            await wait_for(lambda: len(results) == 2)
            assert results[1] == RelayFailure("relay_upstream_timeout", "no")
            # the relay drops us: on_down once, then a reconnect and a fresh HELLO
            relay.mode = "silent"
            link.send(1, req, results.append)
            await wait_for(lambda: link.pending == 1)
            await relay.drop_clients()
            await wait_for(lambda: len(downs) == 1 and len(ups) == 2)
            assert results[2].reason == "connection_lost"  # type: ignore[union-attr]
            # a relay that sends garbage is a framing error: drop and reconnect, no crash
            relay.mode = "garbage"
            link.send(1, req, results.append)
            await wait_for(lambda: len(ups) == 3)
            assert link.counters["framing_bad_version"] == 1
            assert len(downs) == 2
        finally:
            await link.stop()
            await relay.stop()

    asyncio.run(main())


def test_relay_link_bad_hello_backs_off_and_timeout() -> None:
    async def main() -> None:
        relay = FakeRelay(mode="bad_hello")
        await relay.start()
        link = RelayLink(relay.address, "g", rx_clock=time.time_ns, on_up=lambda u: None,
                         on_down=lambda r: None, reconnect_min_s=0.05, reconnect_max_s=0.1,
                         request_timeout_s=0.2)
        await link.start()
        try:
            await wait_for(lambda: link.counters["hello_bad_hello"] >= 3)
            assert not link.connected and "HELLO" in link.last_error
            relay.mode = "silent"
            await wait_for(lambda: link.connected)
            got: list[RelayReply | RelayFailure] = []
            link.send(0, b"\x23" + bytes(47), got.append)
            await wait_for(lambda: bool(got), timeout=2)
            assert got == [RelayFailure("timeout", "no reply in 0.2 s")]
        finally:
            await link.stop()
            await relay.stop()
        # nobody at the address: connect errors are counted, never raised
        link = RelayLink("unix:/nonexistent/relay.sock", "g", rx_clock=time.time_ns,
                         on_up=lambda u: None, on_down=lambda r: None, reconnect_min_s=0.02)
        await link.start()
        try:
            await wait_for(lambda: link.counters["connect_not_found"] >= 2)
        finally:
            await link.stop()

    asyncio.run(main())


def test_backoff_is_exponential_capped_and_jittered() -> None:
    link = RelayLink("unix:/x", "g", rx_clock=time.time_ns, on_up=lambda u: None,
                     on_down=lambda r: None, reconnect_min_s=0.5, reconnect_max_s=30.0,
                     rng=random.Random(1))
    delays = [link._backoff(n) for n in range(12)]
    for n, d in enumerate(delays):
        base = min(30.0, 0.5 * 2**n)
        assert base * 0.5 <= d <= base
    assert len({round(d / min(30.0, 0.5 * 2**n), 6) for n, d in enumerate(delays)}) > 6
    assert max(delays) <= 30.0


# --- daemon with a scripted controller -------------------------------------------------------


class ScriptedController:
    """Implements the GuestController contract; records events, returns scripted actions."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.sources: list[str] = []
        self.next_due: int | None = None
        self.on_reply_actions: list[Action] = []
        self.refused_jumps = 0

    def add_source(self, source: SourceConfig, now_ns: int) -> list[Action]:
        self.events.append(("add", source.name))
        if source.name not in self.sources:
            self.sources.append(source.name)
        self.next_due = now_ns
        return []

    def remove_source(self, name: str) -> None:
        self.events.append(("remove", name))

    def start(self, now_ns: int) -> list[Action]:
        self.events.append(("start",))
        return [SetKernelStatus(KernelStatus(synchronised=False))]

    def on_timer(self, now_ns: int) -> list[Action]:
        self.events.append(("timer", now_ns))
        self.next_due = now_ns + 200_000_000
        from timesyncd.packet import NtpPacket

        packet = NtpPacket(transmit_ts=now_ns).encode()
        return [SendRequest(s, packet) for s in self.sources]

    def on_sent(self, source: str, tx_ns: int) -> None:
        self.events.append(("sent", source, tx_ns))

    def on_reply(self, source: str, data: bytes, rx_ns: int, residence_in_ns: int = 0,
                 residence_out_ns: int = 0) -> list[Action]:
        self.events.append(("reply", source, rx_ns, residence_in_ns, residence_out_ns))
        actions, self.on_reply_actions = self.on_reply_actions, []
        return actions

    def on_source_error(self, source: str, reason: str, now_ns: int) -> list[Action]:
        self.events.append(("error", source, reason))
        return []

    def on_connection_lost(self, now_ns: int,
                           sources: Iterable[str] | None = None) -> list[Action]:
        self.events.append(("lost",))
        return []

    def next_timer_ns(self) -> int | None:
        return self.next_due

    def drain_events(self) -> list[Any]:  # state transitions: this double makes none
        return []

    def base_frequency_ppm(self) -> tuple[float, float | None]:
        return 0.0, None

    def status(self, now_ns: int) -> ControllerStatus:
        return ControllerStatus(state="unsynchronised", offset_s=None, frequency_ppm=0.0,
                                root_distance_s=None, poll_s=1.0, last_update=None, steps=0,
                                refused_jumps=0, rejected={}, sources=[])

    def tracking(self, now_ns: int) -> Tracking:
        return Tracking(None, None, "not synchronised", None, None, None, None)

    def park(self, name: str) -> None:
        self.events.append(("park", name))

    def kinds(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


def test_daemon_drives_controller_over_relay(tmp_path: Path) -> None:
    tmp = str(tmp_path)

    async def main() -> None:
        relay = FakeRelay(upstreams=["udp:192.0.2.1:123", "local"])
        await relay.start()
        clock = SoftwareClock(0.0, 0.0)
        ctrl = ScriptedController()
        settings = GuestSettings(relay=relay.address, clock="software",
                                 status_socket=os.path.join(tmp, "g.sock"),
                                 reconnect_min_s=0.05, reconnect_max_s=0.1, name="vm-1")
        daemon = GuestDaemon(settings, clock, controller=ctrl)  # type: ignore[arg-type]
        await daemon.start()
        try:
            names = [f"relay:{relay.address}#udp:192.0.2.1:123", f"relay:{relay.address}#local"]
            await wait_for(lambda: len(ctrl.kinds("reply")) >= 4)
            assert ctrl.events[0] == ("start",)
            assert clock.kernel_status == KernelStatus(synchronised=False)
            assert [e[1] for e in ctrl.kinds("add")] == names
            # every reply was preceded by on_sent with a send time no later than its rx stamp
            last_sent: dict[str, int] = {}
            for e in list(ctrl.events):
                if e[0] == "sent":
                    last_sent[e[1]] = e[2]
                elif e[0] == "reply":
                    _, src, rx, r_in, r_out = e
                    assert src in names and (r_in, r_out) == (1000, 2000)
                    assert last_sent[src] <= rx < last_sent[src] + 100_000_000
            # clock actions from a reply are applied in order
            ctrl.on_reply_actions = [SetFrequency(-150.0), StepClock(-250_000_000),
                                     SetFrequency(10.0)]
            n = len(ctrl.kinds("reply"))
            await wait_for(lambda: len(ctrl.kinds("reply")) > n)
            assert clock.steps == [-250_000_000] and clock.correction_ppm == 10.0
            assert abs(clock.true_offset_ns() + 250_000_000) < 5_000_000
            # relay errors become on_source_error; a dropped relay becomes on_connection_lost
            relay.mode = "error"
            await wait_for(lambda: len(ctrl.kinds("error")) >= 2)
            assert {e[2] for e in ctrl.kinds("error")} == {"relay_upstream_timeout"}
            relay.mode = "answer"
            await relay.drop_clients()
            await wait_for(lambda: len(ctrl.kinds("lost")) == 1)
            await wait_for(lambda: len(ctrl.kinds("add")) == 4)  # re-armed after reconnecting
            # the relay now offers one upstream: the vanished one is removed
            relay.upstreams = ["local"]
            await relay.drop_clients()
            await wait_for(lambda: ctrl.kinds("remove") == [("remove", names[0])])
            st = await asyncio.get_running_loop().run_in_executor(
                None, query_status, settings.status_socket, 2.0)
            assert st["state"] == "unsynchronised" and st["clock"] == "software"
            assert st["relay"]["connected"] and st["relay"]["upstreams"] == ["local"]
            assert abs(st["true_offset_s"] + 0.25) < 0.01
            hello = relay.hellos[0]
            assert (hello["version"], hello["name"]) == (framing.VERSION, "vm-1")
        finally:
            await daemon.stop()
            await relay.stop()
        assert not os.path.exists(settings.status_socket)

    asyncio.run(main())


def test_daemon_stops_on_clock_permission_error() -> None:
    class NoWrite(SoftwareClock):
        def set_kernel_status(self, status: KernelStatus) -> None:
            raise PermissionError(1, "clock_adjtime needs CAP_SYS_TIME")

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        settings = GuestSettings(relay=relay.address, clock="software", status_socket="")
        daemon = GuestDaemon(settings, NoWrite(), controller=ScriptedController())  # type: ignore[arg-type]
        try:
            with pytest.raises(PermissionError, match="CAP_SYS_TIME"):
                await asyncio.wait_for(daemon.run(asyncio.Event()), 5)
        finally:
            await relay.stop()

    asyncio.run(main())


def test_clock_failure_at_runtime_ends_the_timer_loop_and_wait_failed() -> None:
    """A write failing after start: nothing may keep polling, and supervisors must hear of it."""

    class FailsLater(SoftwareClock):
        def set_frequency(self, ppm: float) -> None:
            raise PermissionError(1, "clock_adjtime (set frequency) not permitted")

    async def main() -> None:
        ntp = await start_ntp_server()
        settings = GuestSettings(servers=(ntp.address,), clock="software", status_socket="",
                                 minpoll=-1, maxpoll=0, burst=2)
        daemon = GuestDaemon(settings, FailsLater(), rng=random.Random(3))
        await daemon.start()
        try:
            fatal = await asyncio.wait_for(daemon.wait_failed(), 5)
            assert isinstance(fatal, PermissionError)
            timer = daemon._timer_task
            assert timer is not None
            await asyncio.wait_for(asyncio.shield(timer), 2)  # ended by itself, not cancelled
            sent = len(ntp.received)
            await asyncio.sleep(1.2)  # more than a poll interval (2^0 s)
            assert len(ntp.received) == sent
        finally:
            await daemon.stop()
            ntp.close()

    asyncio.run(main())


def test_relay_drop_keeps_polling_direct_udp_servers(tmp_path: Path) -> None:
    """Losing the relay stops only the sources it carried; a direct UDP server keeps the guest
    synchronised through the outage and after the reconnect."""

    async def main() -> None:
        ntp = await start_ntp_server()
        relay = FakeRelay(path=str(tmp_path / "relay.sock"))
        await relay.start()
        settings = GuestSettings(relay=relay.address, servers=(ntp.address,), clock="software",
                                 status_socket="", minpoll=-1, maxpoll=0, burst=2,
                                 health_interval_s=0, reconnect_min_s=0.2, reconnect_max_s=0.2)
        daemon = GuestDaemon(settings, SoftwareClock(), rng=random.Random(5))
        await daemon.start()
        relay2: FakeRelay | None = None
        try:
            relay_name = f"relay:{relay.address}#local"

            def relay_reachable() -> bool:
                return any(s["name"] == relay_name and s["reachable"]
                           for s in daemon.status()["sources"])

            # both sources in use first (on a loaded machine the UDP one alone can synchronise
            # the guest before the relay's HELLO is answered)
            await wait_for(lambda: daemon.controller.state == "synchronised" and relay_reachable())
            assert daemon.link is not None
            await relay.stop()  # the relay goes away; the direct server is still fine
            await wait_for(lambda: daemon.link is not None and not daemon.link.connected)
            sent = len(ntp.received)
            await wait_for(lambda: len(ntp.received) >= sent + 3)
            assert daemon.controller.state == "synchronised"
            by_name = {s["name"]: s for s in daemon.status()["sources"]}
            assert by_name[ntp.address]["reachable"]
            assert not by_name[relay_name]["reachable"]
            relay2 = FakeRelay(path=relay.path)
            await relay2.start()  # back: its source is re-armed, the UDP one never stopped
            await wait_for(lambda: daemon.link is not None and daemon.link.connected)
            sent = len(ntp.received)
            await wait_for(lambda: len(ntp.received) >= sent + 2 and relay2.requests >= 2)
            assert daemon.controller.state == "synchronised"
        finally:
            await daemon.stop()
            ntp.close()
            if relay2 is not None:
                await relay2.stop()
            await relay.stop()

    asyncio.run(main())


# --- daemon with the real controller against the fake relay ---------------------------------


def test_daemon_with_controller_converges_on_fake_relay() -> None:
    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = SoftwareClock(100.0, 0.05)
        settings = GuestSettings(relay=relay.address, clock="software", status_socket="",
                                 minpoll=-1, maxpoll=0, burst=2)
        daemon = GuestDaemon(settings, clock, rng=random.Random(7))
        await daemon.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = daemon.status()
                if st["state"] == "synchronised" and abs(clock.true_offset_ns()) < 1_000_000:
                    break
                await asyncio.sleep(0.1)
            # within 1 ms on a quiet machine (about 3 s); with two suites at once on 2 vCPUs
            # the replies' delays reach milliseconds and the guest was 1.0008 ms off after
            # 20 s (twice): what must hold is that it converged from 50 ms and says how far
            st, true = daemon.status(), abs(clock.true_offset_ns()) / 1e9
            assert st["state"] == "synchronised" and true < 0.005, st
            assert true <= st["error_bound_s"], (true, st)
        finally:
            await daemon.stop()
            await relay.stop()

    asyncio.run(main())


def test_a_bug_in_the_timer_path_is_fatal_not_a_silent_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping the controller must end the daemon (exit 1 under the CLI, so a
    supervisor restarts it), not leave it looking alive without polling."""
    from guest_client.controller import GuestController
    from timesyncd.discipline import DisciplineConfig

    class Broken(GuestController):
        def next_timer_ns(self) -> int | None:
            return 0  # due at once

        def on_timer(self, now_ns: int) -> list:  # type: ignore[type-arg]
            raise ZeroDivisionError("a controller bug")

    async def main() -> BaseException:
        ntp = await start_ntp_server()
        settings = GuestSettings(servers=(ntp.address,), clock="software", status_socket="",
                                 minpoll=-1, maxpoll=0)
        daemon = GuestDaemon(settings, SoftwareClock(), rng=random.Random(3),
                             controller=Broken(DisciplineConfig(), random.Random(1)))
        await daemon.start()
        try:
            return await asyncio.wait_for(daemon.wait_failed(), 5)
        finally:
            await daemon.stop()
            ntp.close()

    fatal = asyncio.run(main())
    assert isinstance(fatal, ZeroDivisionError)
    assert "internal error, stopping: a controller bug" in caplog.text


def test_a_bug_in_a_relay_link_callback_is_fatal_not_a_silent_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> BaseException:
        relay = FakeRelay()
        await relay.start()
        settings = GuestSettings(relay=relay.address, clock="software", status_socket="")
        daemon = GuestDaemon(settings, SoftwareClock(), rng=random.Random(3))

        def broken(upstreams: object) -> None:
            raise KeyError("a callback bug")

        daemon._relay_up = broken  # type: ignore[method-assign,assignment]
        await daemon.start()
        try:
            return await asyncio.wait_for(daemon.wait_failed(), 5)
        finally:
            await daemon.stop()
            await relay.stop()

    fatal = asyncio.run(main())
    assert isinstance(fatal, KeyError)
    assert "relay link failed, stopping" in caplog.text
