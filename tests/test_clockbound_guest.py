"""A guest daemon publishing the ClockBound segment (``--clockbound-shm``): status through start,
sync, holdover, unsynchronised and stop; the published bound contains the software clock's
true offset, mid-slew included; the independent reader, the API and ``timesync now`` agree
with ``timesync status``."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from chrony_fixture import ChronyServer, chrony_server  # noqa: F401 - pytest fixture
from click.testing import CliRunner
from guest_fakes import FakeRelay
from loops import LOOPS, run
from test_clockbound import spec_read

from guest_client.clockbound_writer import UNKNOWN_BOUND_NS
from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.cli.now import now as now_cmd
from timesyncd.cli.status import status as status_cmd
from timesyncd.clockbound import BoundedClock, ClockStatus

pytestmark = pytest.mark.timeout(120)
STATE = {"synchronised": ClockStatus.SYNCHRONIZED, "holdover": ClockStatus.FREE_RUNNING,
         "unsynchronised": ClockStatus.UNKNOWN}


class Checker:
    """Reads the segment through the API on the daemon's software clock and checks that
    [earliest, latest] contains true time (the machine's CLOCK_REALTIME) on every read."""

    def __init__(self, path: str, clock: SoftwareClock) -> None:
        self.api = BoundedClock(path, realtime_ns=clock.now_ns)
        self.clock = clock
        self.checked = 0
        self.mid_slew = 0  # checks made while the clock was over 1 ms off and being slewed
        self.worst_margin_s = float("inf")

    def check(self) -> ClockStatus:
        r0 = time.time_ns()
        t = self.api.now()
        r1 = time.time_ns()
        # every published bound must hold, also while the guest is not yet synchronised
        # (mid-slew) and the status says Unknown; only the start-up ceiling is not a bound
        if t.bound_ns < UNKNOWN_BOUND_NS:
            true_off = self.clock.true_offset_ns()
            assert t.earliest_ns <= r1 and t.latest_ns >= r0, (
                f"bound {t.bound_ns / 1e9:.6f} s misses the truth: true offset "
                f"{true_off / 1e9:+.6f} s, status {t.status.name}")
            self.checked += 1
            self.worst_margin_s = min(self.worst_margin_s, (t.bound_ns - abs(true_off)) / 1e9)
            if abs(true_off) > 1_000_000 and self.clock.correction_ppm != 0:
                self.mid_slew += 1
        return t.status


async def poll(checker: Checker, until: Any, timeout_s: float, seen: list[ClockStatus]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = checker.check()
        if not seen or seen[-1] is not status:
            seen.append(status)
        if until(status):
            return
        assert time.monotonic() < deadline, f"statuses seen: {[s.name for s in seen]}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("loop", LOOPS)
def test_status_through_start_sync_holdover_unsynchronised_stop(
        tmp_path: Path, loop: str) -> None:
    path = str(tmp_path / "clockbound" / "shm0")

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = SoftwareClock(100.0, 0.02)
        # a fast-growing holdover bound so that holdover ends within seconds
        settings = GuestSettings(relay=relay.address, clock="software", status_socket="",
                                 clockbound_shm=path, minpoll=-1, maxpoll=0, burst=2,
                                 holdover_drift_ppm=100_000.0, max_clock_error_ppm=100_000.0,
                                 max_error_s=0.3,
                                 reconnect_min_s=5.0, reconnect_max_s=5.0)
        daemon = GuestDaemon(settings, clock, rng=random.Random(3))
        await daemon.start()
        seen: list[ClockStatus] = []
        try:
            assert spec_read(path)["status"] == ClockStatus.UNKNOWN  # at start
            checker = Checker(path, clock)
            await poll(checker, lambda s: s is ClockStatus.SYNCHRONIZED, 20, seen)
            assert daemon.status()["state"] == "synchronised"
            await relay.stop()  # the link drops: holdover
            await poll(checker, lambda s: s is ClockStatus.FREE_RUNNING, 10, seen)
            assert daemon.status()["state"] == "holdover"
            seg = spec_read(path)
            assert seg["max_drift"] >= 100_000_000  # the frequency-error allowance, in ppb
            await poll(checker, lambda s: s is ClockStatus.UNKNOWN, 15, seen)
            assert daemon.status()["state"] == "unsynchronised"
            assert spec_read(path)["status"] == ClockStatus.UNKNOWN
        finally:
            await daemon.stop()
            await relay.stop()
        assert seen == [ClockStatus.UNKNOWN, ClockStatus.SYNCHRONIZED,
                        ClockStatus.FREE_RUNNING, ClockStatus.UNKNOWN]
        assert checker.checked > 10
        final = spec_read(path)
        assert final["status"] == ClockStatus.UNKNOWN and os.path.exists(path)  # on stop

    run(main, loop)


def test_real_guest_bound_holds_mid_slew_and_everything_agrees(
        tmp_path: Path, chrony_server: ChronyServer) -> None:  # noqa: F811
    """chronyd -x -> relay -> guest; the clock starts 0.3 s off and is slewed at most 2000 ppm,
    so every check for many seconds happens mid-slew."""
    path = str(tmp_path / "shm0")
    sock = str(tmp_path / "relay.sock")
    status_sock = str(tmp_path / "g.sock")

    async def main() -> None:
        relay = RelayService(RelaySettings(upstreams=(chrony_server.address,),
                                           listen=(f"unix:{sock}",), rate_limit=1000.0,
                                           rate_burst=1000))
        await relay.start()
        clock = SoftwareClock(200.0, 0.3)
        settings = GuestSettings(relay=f"unix:{sock}", clock="software", minpoll=-1,
                                 maxpoll=0, status_socket=status_sock, clockbound_shm=path,
                                 max_slew_ppm=2000.0)
        daemon = GuestDaemon(settings, clock, rng=random.Random(5))
        await daemon.start()
        loop = asyncio.get_running_loop()
        try:
            checker = Checker(path, clock)
            seen: list[ClockStatus] = []
            # 0.3 s off, slewed at 2000 ppm: honestly not synchronised for minutes (the
            # remaining correction is over sync_max_correction_s), but the bound holds
            await poll(checker, lambda s: checker.mid_slew > 0, 30, seen)
            end = time.monotonic() + 8
            while time.monotonic() < end:
                checker.check()
                await asyncio.sleep(0.02)
            assert checker.mid_slew > 100, checker.mid_slew
            assert abs(clock.true_offset_ns()) > 0.1e9  # still slewing 0.3 s at 2000 ppm
            # agreement: daemon status, `timesync status --json`, `timesync now --json`,
            # the independent reader and the API
            cli = CliRunner()
            st_out = await loop.run_in_executor(None, lambda: cli.invoke(
                status_cmd, ["--socket", status_sock, "--json"]))
            st = json.loads(st_out.output)
            now_out = await loop.run_in_executor(None, lambda: cli.invoke(
                now_cmd, ["--path", path, "--json"]))
            assert now_out.exit_code == 0, now_out.output
            nw = json.loads(now_out.output)
            seg = spec_read(path)
            api = checker.api.snapshot()
            assert st["state"] == "unsynchronised" and nw["status"] == "unknown"
            assert seg["status"] == api.status == STATE[st["state"]]
            assert nw["published_bound_s"] == seg["bound"] / 1e9 == api.bound_ns / 1e9 \
                or seg["generation"] != nw["generation"]  # a refresh between the reads
            rd, true_off = st["root_distance_s"], abs(st["true_offset_s"])
            # the bound is the root distance plus the offset still being slewed
            assert rd - 1e-4 <= nw["published_bound_s"] <= 2 * rd + true_off + 0.01, (nw, st)
            assert nw["bound_s"] >= nw["published_bound_s"]
            assert 0 <= nw["segment_age_s"] < 1.5 and nw["void_in_s"] > 1.4
            assert nw["max_drift_ppb"] >= 1000  # the 1 ppm holdover allowance at least
            assert st["clockbound"]["path"] == path and st["clockbound"]["writes"] > 5
        finally:
            await daemon.stop()
            await relay.stop()
        print(f"{checker.checked} checks, {checker.mid_slew} mid-slew; smallest margin "
              f"(bound - |true offset|) {checker.worst_margin_s * 1e3:.3f} ms")
        out = CliRunner().invoke(now_cmd, ["--path", path, "--json"])
        assert json.loads(out.output)["status"] == "unknown"  # written on stop

    asyncio.run(main())


def test_now_cli_reports_a_missing_segment_clearly(tmp_path: Path) -> None:
    out = CliRunner().invoke(now_cmd, ["--path", str(tmp_path / "nope")])
    assert out.exit_code == 1 and "cannot read the ClockBound segment" in out.output
    (tmp_path / "junk").write_bytes(b"\0" * 80)
    out = CliRunner().invoke(now_cmd, ["--path", str(tmp_path / "junk")])
    assert out.exit_code == 1 and "bad magic" in out.output


def test_second_guest_on_the_same_segment_refuses_to_start(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        s = GuestSettings(relay=relay.address, clock="software", status_socket="",
                          clockbound_shm=path)
        first = GuestDaemon(s, SoftwareClock())
        await first.start()
        try:
            second = GuestDaemon(s, SoftwareClock())
            with pytest.raises(OSError, match="locked by another writer"):
                await second.start()
            assert second.link is None or not second.link.connected
        finally:
            await first.stop()
            await relay.stop()

    asyncio.run(main())
