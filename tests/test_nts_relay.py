"""NTS end to end through the relay: guest daemon -> (hostile) host -> relay -> real chronyd.

chronyd serves NTS on loopback with a self-signed certificate (``-x``: it never touches the
clock). The guest disciplines a SoftwareClock, so "the clock moved" is measured exactly
against the machine clock, which nothing here writes.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_relay import HostileRelay
from loops import wait_for
from nts_fixture import NtsServer, chronyd_nts, free_port

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.nts_manager import nts_ke_via_relay
from guest_client.nts_source import NtsSource, ntp_upstream_candidates, parse_nts_server
from guest_client.relay_link import RelayLink
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.cli.status import format_status
from timesyncd.nts.ke import KeError
from timesyncd.nts.ke_session import NtsKeSession

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def chrony(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NtsServer]:
    with chronyd_nts(tmp_path_factory.mktemp("chronyd-nts-relay")) as server:
        yield server


def relay_settings(chrony: NtsServer, sock: Path, **kw: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "listen": (f"unix:{sock}",), "upstreams": (f"udp:{chrony.host}:{chrony.ntp_port}",),
        "nts_ke_servers": (f"tcp:{chrony.host}:{chrony.ke_port}",), "rate_limit": 100.0}
    values.update(kw)
    return RelaySettings(**values)


def guest_settings(chrony: NtsServer, relay: str, **kw: Any) -> GuestSettings:
    values: dict[str, Any] = {
        "relay": relay, "clock": "software", "status_socket": "",
        "nts_servers": (f"localhost@{chrony.host}:{chrony.ke_port}",),
        "nts_ca_file": str(chrony.cafile), "relay_plain_sources": False,
        "minpoll": -2, "maxpoll": -2, "burst": 2, "reconnect_min_s": 0.05,
        "request_timeout_s": 1.0}
    values.update(kw)
    s = GuestSettings(**values)
    s.validate()
    return s




Scenario = Callable[[GuestDaemon, SoftwareClock, HostileRelay, RelayService], Awaitable[None]]


def run(chrony: NtsServer, tmp_path: Path, scenario: Scenario, *, offset_s: float = 5.0,
        relay_kw: dict[str, Any] | None = None, guest_kw: dict[str, Any] | None = None) -> None:
    async def main() -> None:
        relay = RelayService(relay_settings(chrony, tmp_path / "relay.sock", **(relay_kw or {})))
        await relay.start()
        host = HostileRelay(tmp_path / "host.sock", f"unix:{tmp_path / 'relay.sock'}")
        await host.start()
        clock = SoftwareClock(offset_s=offset_s)
        daemon = GuestDaemon(guest_settings(chrony, host.address, **(guest_kw or {})), clock,
                             rng=random.Random(7))
        await daemon.start()
        try:
            await scenario(daemon, clock, host, relay)
        finally:
            await daemon.stop()
            await host.stop()
            await relay.stop()
        assert relay.ke_proxy.open_streams == 0

    asyncio.run(main())


def nts_status(daemon: GuestDaemon) -> dict[str, Any]:
    (src,) = [s for s in daemon.status()["sources"] if s["name"].startswith("nts:")]
    return src


async def synced(daemon: GuestDaemon, clock: SoftwareClock, within_s: float = 0.005) -> None:
    """Synchronised and settled: the true error *and* the guest's own estimate are small."""

    def settled() -> bool:
        st = daemon.status()
        return (st["state"] == "synchronised" and st["offset_s"] is not None
                and abs(st["offset_s"]) < within_s and abs(st["true_offset_s"]) < within_s
                and nts_status(daemon)["samples"] >= 3)

    await wait_for(settled, 15.0, "NTS sync")


# --- parsing and mapping ---------------------------------------------------------------------


def test_nts_server_spec_forms() -> None:
    s = parse_nts_server("time.example.com")
    assert (s.tls_name, s.host, s.port, s.ke_endpoint) == (
        "time.example.com", "time.example.com", 4460, "tcp:time.example.com:4460")
    s = parse_nts_server("localhost@127.0.0.1:4461")
    assert (s.tls_name, s.ke_endpoint, s.source_name) == (
        "localhost", "tcp:127.0.0.1:4461", "nts:localhost@127.0.0.1:4461")
    assert parse_nts_server("[::1]:44").ke_endpoint == "tcp:[::1]:44"
    for bad in ("", "a:b:c", "x:0", "x:99999", "@h", "na me@h", "x:4460x"):
        with pytest.raises(ValueError):
            parse_nts_server(bad)
    # no Server record (server == our TLS name): the KE host's relay name also qualifies
    assert ntp_upstream_candidates(s, "localhost", 123) == ["udp:localhost:123",
                                                            "udp:127.0.0.1:123"]
    assert ntp_upstream_candidates(s, "other.example", 123) == ["udp:other.example:123"]


def test_settings_validate_nts_keys(tmp_path: Path) -> None:
    ok = GuestSettings(relay="unix:/r", clock="software", nts_servers=("localhost@127.0.0.1",),
                       source_trust=("udp:127.0.0.1:123=authenticated",))
    ok.validate()
    assert ok.trust_overrides() == {"udp:127.0.0.1:123": "authenticated"}
    bad = [
        ({"nts_servers": ("a:b:c",)}, "nts_servers"),
        ({"nts_servers": ("x", "x:4460")}, "twice"),
        ({"relay": None, "servers": ("udp:127.0.0.1:123",), "nts_servers": ("x",)}, "relay"),
        ({"nts_ca_file": str(tmp_path / "missing.pem")}, "nts_ca_file"),
        ({"source_trust": ("x=trusted",)}, "source_trust"),
    ]
    for values, match in bad:
        with pytest.raises(ValueError, match=match):
            GuestSettings(**{"relay": "unix:/r", "clock": "software", **values}).validate()
    with pytest.raises(ValueError, match="tcp:HOST:PORT"):
        RelaySettings(listen=("unix:/r",), nts_ke_servers=("udp:127.0.0.1:4460",)).validate()


# --- NTS-KE over a relay stream --------------------------------------------------------------


def test_nts_ke_through_relay_stream(chrony: NtsServer, tmp_path: Path) -> None:
    bad_port = free_port(socket.SOCK_STREAM)  # nobody listens: connect is refused

    async def main() -> None:
        relay = RelayService(relay_settings(
            chrony, tmp_path / "r.sock",
            nts_ke_servers=(f"tcp:{chrony.host}:{chrony.ke_port}", f"tcp:127.0.0.1:{bad_port}")))
        await relay.start()
        up = asyncio.Event()
        link = RelayLink(f"unix:{tmp_path / 'r.sock'}", "t", rx_clock=time.time_ns,
                         on_up=lambda _: up.set(), on_down=lambda _: None)
        await link.start()
        try:
            await asyncio.wait_for(up.wait(), 5)
            assert link.hello_info["nts_ke"] == [
                {"index": 0, "name": f"tcp:{chrony.host}:{chrony.ke_port}"},
                {"index": 1, "name": f"tcp:127.0.0.1:{bad_port}"}]
            results = [await nts_ke_via_relay(link, 0, NtsKeSession(
                "localhost", cafile=str(chrony.cafile)), 5.0) for _ in range(3)]
            assert all(len(r.cookies) == 8 and r.port == chrony.ntp_port for r in results)
            assert len({r.c2s_key for r in results}) == 3
            for index, reason in ((1, "relay_stream_failed"), (7, "relay_unknown_endpoint")):
                with pytest.raises(KeError) as info:
                    await nts_ke_via_relay(link, index, NtsKeSession(
                        "localhost", cafile=str(chrony.cafile)), 5.0)
                assert info.value.reason == reason
            with pytest.raises(KeError) as info:  # TLS is end to end: the name is ours to check
                await nts_ke_via_relay(link, 0, NtsKeSession(
                    "wrong.example", cafile=str(chrony.cafile)), 5.0)
            assert info.value.reason == "name_mismatch"
            await wait_for(lambda: relay.ke_proxy.open_streams == 0, 5, "streams closed")
            counters = relay.ke_proxy.counters
            assert counters["opened"] == 5 and counters["connect_failed"] == 1
            assert counters["unknown_endpoint"] == 1
        finally:
            await link.stop()
            await relay.stop()

    asyncio.run(main())


# --- the guest syncs with NTS through the relay -----------------------------------------------


def test_guest_syncs_with_nts_through_relay(chrony: NtsServer, tmp_path: Path) -> None:
    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await synced(daemon, clock)
        src = nts_status(daemon)
        assert src["authenticated"] and src["trust"] == "authenticated" and src["selected"]
        nts = src["nts"]
        assert nts["ready"] and nts["key_exchanges"] == 1 and nts["certificate_dates_checked"]
        assert nts["cookies"] >= 7 and nts["ntp_server"] == f"localhost:{chrony.ntp_port}"
        assert clock.steps and abs(clock.steps[0] / 1e9 + 5.0) < 0.01  # the initial step
        assert relay.ke_proxy.counters["opened"] == 1
        text = format_status(daemon.status())
        line = next(x for x in text.splitlines() if x[4:].startswith("nts:"))
        assert line.startswith("* A ")  # the reference, authenticated
        # polled only once NTS-KE gave keys: a clean start counts nothing (no refused polls
        # while KE runs, and so no "missed" replies to them)
        early = dict(src["rejected"])
        assert not early, early
        # cookies are used once and refilled from replies: more exchanges need no new NTS-KE
        rx = daemon.nts.sources[src["name"]].state
        assert rx is not None
        got = src["nts"]["cookies"]
        await wait_for(lambda: nts_status(daemon)["samples"] >= src["samples"] + 8, 10, "polls")
        assert nts_status(daemon)["nts"]["key_exchanges"] == 1
        later = nts_status(daemon)["rejected"]
        assert not {k for k in later if k.startswith("nts_") and later[k] != early.get(k)}
        assert got >= 7

    run(chrony, tmp_path, scenario)


def test_ntp_server_not_allowlisted_is_reported(chrony: NtsServer, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await wait_for(lambda: "does not allowlist" in nts_status(daemon)["note"], 10, "note")
        src = nts_status(daemon)
        assert f"udp:127.0.0.1:{chrony.ntp_port}" in src["note"]
        assert src["rejected"]["ntp_server_not_allowlisted"] >= 1
        assert daemon.controller.state == "unsynchronised" and not clock.steps
        assert "does not allowlist" in caplog.text

    other = free_port(socket.SOCK_DGRAM)
    run(chrony, tmp_path, scenario, relay_kw={"upstreams": (f"udp:127.0.0.1:{other}",)})


def test_ke_endpoint_not_offered_is_reported(chrony: NtsServer, tmp_path: Path) -> None:
    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await wait_for(lambda: "does not offer NTS-KE" in nts_status(daemon)["note"], 10, "note")
        assert nts_status(daemon)["rejected"]["nts_ke_endpoint_not_offered"] >= 1
        assert not clock.steps

    run(chrony, tmp_path, scenario, relay_kw={"nts_ke_servers": ()})


# --- a hostile host ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "reason"), [
    ("rewrite", "nts_bad_auth"),  # (a) server timestamps rewritten
    ("replay", "nts_uid_mismatch"),  # (b) an old genuine reply
    ("strip", "nts_missing_uid"),  # (c) NTS fields stripped
    ("corrupt", "nts_bad_auth"),  # (c) NTS fields corrupted
])
def test_hostile_host_cannot_move_the_clock(chrony: NtsServer, tmp_path: Path, mode: str,
                                            reason: str) -> None:
    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await synced(daemon, clock)
        steps = list(clock.steps)
        before = clock.true_offset_ns()
        host.mode = mode
        await wait_for(lambda: nts_status(daemon)["rejected"].get(reason, 0) >= 6, 10,
                       f"{mode} rejections")
        st = daemon.status()
        src = nts_status(daemon)
        assert host.counts[mode] >= 6
        assert set(src["rejected"]) <= {reason, "no_reply", "nts_not_ready", "nts_no_cookies"}, \
            src["rejected"]
        assert src["nts"]["errors"][reason] >= 6
        assert st["rejected"][reason] >= 6
        assert clock.steps == steps and st["refused_jumps"] == 0
        assert abs(clock.true_offset_ns() - before) < 2_000_000  # 2 ms: no sample got in

    run(chrony, tmp_path, scenario)


def test_hostile_from_first_boot_never_syncs(chrony: NtsServer, tmp_path: Path) -> None:
    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        host.mode = "rewrite"
        await wait_for(lambda: nts_status(daemon)["rejected"].get("nts_bad_auth", 0) >= 5, 10,
                       "rejections")
        assert daemon.controller.state == "unsynchronised" and not clock.steps
        assert abs(clock.true_offset_ns() - 5e9) < 1e7

    run(chrony, tmp_path, scenario)


@pytest.mark.parametrize(("delay_s", "lie"), [(0.05, False), (0.2, False), (0.1, True)])
def test_one_way_delay_stays_within_reported_bound(chrony: NtsServer, tmp_path: Path,
                                                   delay_s: float, lie: bool) -> None:
    """(d) The host delays replies only: the guest is dragged by about half the delay, and
    its reported error bound (root distance, which includes half the round trip) holds, even
    when the host also lies about the relay's residence times (NTS sources ignore them)."""

    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        host.mode, host.delay_s, host.lie_residence = "delay", delay_s, lie
        # past the initial step and the first few samples of the new time scale
        await wait_for(lambda: daemon.controller.state == "synchronised"
                       and nts_status(daemon)["samples"] >= 4, 15, "sync")
        worst = 0.0
        for _ in range(40):
            await asyncio.sleep(0.05)
            st = daemon.status()
            error = st["true_offset_s"]
            # the guest claims: true offset in [offset_s - root_distance_s, ... + ...]
            assert abs(error - st["offset_s"]) <= st["root_distance_s"], st
            worst = max(worst, abs(error))
        assert worst < delay_s / 2 + 0.01  # dragged, but never beyond half the round trip
        assert host.counts["delay"] >= 5

    run(chrony, tmp_path, scenario)


def test_plain_source_is_bounded_by_nts_and_snapshot_jump_is_stepped_once(
        chrony: NtsServer, tmp_path: Path) -> None:
    """NTS and the same server as a plain relay source. The host shifts plain replies by
    50 ms (below the step threshold): the plain source is held outside the authenticated
    bounds. Then the guest's clock jumps 30 s (a restored snapshot): NTS confirms it, it is
    stepped back once and reported."""

    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await synced(daemon, clock)
        (plain,) = [s for s in daemon.status()["sources"] if s["name"].startswith("relay:")]
        assert not plain["authenticated"] and plain["trust"] == "host"
        host.mode, host.shift_s = "rewrite_plain", 0.05
        await wait_for(lambda: next(
            s for s in daemon.status()["sources"] if s["name"] == plain["name"]
        )["rejected"].get("outside_authenticated_bounds", 0) >= 3, 15, "bounded plain source")
        assert abs(clock.true_offset_ns()) < 5e6  # not dragged towards +-50 ms
        steps = len(clock.steps)
        refused = daemon.status()["refused_jumps"]
        clock.step(30 * 1_000_000_000)  # restored snapshot: the guest is 30 s ahead
        await wait_for(lambda: len(clock.steps) > steps + 1, 15, "confirmed step")
        await asyncio.sleep(1.0)
        assert len(clock.steps) == steps + 2  # ours, then exactly one correction
        assert abs(clock.steps[-1] / 1e9 + 30.0) < 0.1  # sized by the NTS source
        st = daemon.status()
        assert st["refused_jumps"] > refused  # reported before it was confirmed
        assert abs(clock.true_offset_ns()) < 5e6

    run(chrony, tmp_path, scenario, guest_kw={"relay_plain_sources": True, "step_limit": 2})


def test_bootstrap_with_clock_far_ahead_rechecks_certificate_dates(
        chrony: NtsServer, tmp_path: Path) -> None:
    """The guest boots two years ahead: to its clock chronyd's certificate has expired. The
    first NTS-KE tolerates that (chain and name still checked), the guest syncs, then NTS-KE
    runs again with dates checked against the now disciplined clock, and passes."""

    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await wait_for(lambda: nts_status(daemon)["nts"]["key_exchanges"] >= 2
                       and nts_status(daemon)["nts"]["certificate_dates_checked"], 20,
                       "date re-check")
        assert abs(clock.true_offset_ns()) < 5e6
        src = nts_status(daemon)
        assert src["rejected"].get("nts_ke_cert_expired", 0) == 0
        assert src["nts"]["ready"] and not src["nts"]["disabled"]

    run(chrony, tmp_path, scenario, offset_s=2 * 365 * 86400.0)


def test_bootstrap_certificate_invalid_at_synchronised_time_disables_source(
        tmp_path: Path) -> None:
    """chronyd's certificate is valid only from next year. Booting with the real time, the
    guest tolerates it once, syncs, then the date check against its synchronised clock fails
    and the source is disabled for good."""
    import datetime as dt

    from nts_fixture import make_cert

    cert = make_cert(tmp_path, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    with chronyd_nts(tmp_path / "srv", cert) as server:
        async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                           relay: RelayService) -> None:
            await wait_for(lambda: nts_status(daemon)["nts"]["disabled"], 20, "disabled")
            src = nts_status(daemon)
            assert "certificate not valid at the synchronised time" in src["note"]
            assert src["rejected"]["nts_ke_cert_not_yet_valid"] == 1
            samples = src["samples"]
            await asyncio.sleep(1.0)
            assert nts_status(daemon)["rejected"]["nts_disabled"] >= 2
            assert nts_status(daemon)["samples"] <= samples

        run(server, tmp_path, scenario, offset_s=0.5)


def test_cli_guest_with_nts_source_syncs_and_status_shows_it_authenticated(
        chrony: NtsServer, tmp_path: Path) -> None:
    """The whole thing as a user runs it: `timesync relay`, `timesync guest --nts-server`,
    `timesync status`, as separate processes (software clock: nothing writes the real one)."""
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-c", "from timesyncd.cli import main; main()"]
    relay_sock, status_sock = tmp_path / "relay.sock", tmp_path / "guest.sock"
    logs_out = [(tmp_path / f"{n}.log").open("wb") for n in ("relay", "guest")]
    procs = [
        subprocess.Popen(cli + [
            "relay", "--listen", f"unix:{relay_sock}",
            "--upstream", f"udp:{chrony.host}:{chrony.ntp_port}",
            "--nts-ke-server", f"tcp:{chrony.host}:{chrony.ke_port}"],
            stdout=subprocess.DEVNULL, stderr=logs_out[0]),
    ]
    try:
        deadline = time.monotonic() + 10
        while not relay_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.append(subprocess.Popen(cli + [
            "guest", "--relay", f"unix:{relay_sock}", "--clock", "software",
            "--software-offset", "3", "--status-socket", str(status_sock),
            "--nts-server", f"localhost@{chrony.host}:{chrony.ke_port}",
            "--nts-ca-file", str(chrony.cafile), "--no-relay-plain-sources",
            "--minpoll", "-2", "--maxpoll", "-1"],
            stdout=subprocess.DEVNULL, stderr=logs_out[1]))
        st: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run(cli + ["status", "--socket", str(status_sock), "--json"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                st = json.loads(out.stdout)
                if st["state"] == "synchronised" and abs(st["true_offset_s"]) < 0.005:
                    break
            time.sleep(0.2)
        logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in ("relay", "guest")}
        assert st.get("state") == "synchronised", (st, logs)
        (src,) = st["sources"]
        assert src["name"].startswith("nts:") and src["authenticated"] and src["nts"]["ready"]
        text = subprocess.run(cli + ["status", "--socket", str(status_sock)],
                              capture_output=True, text=True, timeout=10).stdout
        line = next(x for x in text.splitlines() if x[4:].startswith("nts:"))
        assert line.startswith("* A "), text  # the reference, authenticated
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in logs_out:
            fh.close()


def test_nts_source_remaps_after_relay_reconnect() -> None:
    """Sans-IO: keys survive a reconnect that moves our NTP server to another index, and
    are dropped (KE again) when the relay stops offering it."""
    import os as _os

    from timesyncd.nts.ke_session import NtsKeResult

    spec = parse_nts_server("localhost@127.0.0.1:4460")
    src = NtsSource(spec)
    result = NtsKeResult(15, _os.urandom(32), _os.urandom(32), (b"c" * 64,) * 8,
                         "localhost", 1234)
    assert src.on_ke_result(result, {"udp:127.0.0.1:1234": 2}) and src.upstream == 2
    src.remap({"udp:10.0.0.1:123": 0, "udp:127.0.0.1:1234": 1})
    assert src.ready and src.upstream == 1
    src.remap({"udp:10.0.0.1:123": 0})
    assert not src.ready and src.needs_ke and "no longer offers" in src.note
    assert src.wrap(b"\x23" + bytes(47)) == "nts_not_ready"
