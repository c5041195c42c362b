"""Clean stop and warm restart, in process: a ``SoftwareClock`` outlives the daemon as a kernel
clock does, and knows its true offset (issue 9, items 3 and 4).

- every stop (``stop()``, a fatal clock error) leaves the base frequency on the clock, no slew;
- a restart with a frequency file starts from it and stays within 2x the steady-state max
  offset + 100 us; after a kill (no clean stop) the bound still covers the truth;
- without a file the kernel's correction is kept only when it is a plausible base (tick
  nominal, |f| <= 500 ppm), else reset, and the new controller models it either way.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from guest_fakes import FakeRelay
from loops import LOOPS, run, wait_for

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.freq_file import load
from guest_client.settings import GuestSettings
from timesyncd.clock import KernelStatus

_NS = 1_000_000_000


def bound_of(status: dict[str, Any]) -> float:
    """The guest's error bound around its clock reading, as status reports it."""
    return float(status["error_bound_s"])


def _settings(relay: FakeRelay, **kw: Any) -> GuestSettings:
    base: dict[str, Any] = dict(relay=relay.address, clock="software", status_socket="",
                                minpoll=-1, maxpoll=0, burst=2, health_interval_s=0)
    return GuestSettings(**{**base, **kw})


def _kill(daemon: GuestDaemon) -> None:
    """What SIGKILL leaves: whatever the clock holds stays, no file is written."""
    daemon._clock_touched = False


async def _watch(daemon: GuestDaemon, clock: SoftwareClock, seconds: float,
                 ) -> list[tuple[float, dict[str, Any]]]:
    """(true offset, status) every 50 ms for ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append((clock.true_offset_ns() / _NS, daemon.status()))
        await asyncio.sleep(0.05)
    return out


def _uncovered(trace: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, float]]:
    """(true, bound) for every synchronised sample whose bound misses the true offset."""
    return [(true, bound_of(st)) for true, st in trace
            if st["state"] == "synchronised" and abs(true) > bound_of(st)]


# --- clean stop -------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_mid_slew_leaves_the_base_frequency(loop: str) -> None:
    """Issue 9 item 3: stopping during the initial slew left -76,923 ppm on the clock."""

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = SoftwareClock(40.0, 0.2)  # 200 ms ahead: slewed at up to 83,333 ppm
        daemon = GuestDaemon(_settings(relay), clock, rng=random.Random(1))
        await daemon.start()
        try:
            await wait_for(lambda: abs(clock.correction_ppm) > 10_000, what="slewing")
        finally:
            await daemon.stop()
            await relay.stop()
        assert abs(clock.correction_ppm) <= 500, clock.correction_ppm  # no slew left behind
        assert clock.correction_ppm == daemon.controller.base_frequency_ppm()[0]
        before = clock.true_offset_ns()
        await asyncio.sleep(0.5)  # left alone: drifts at most by native + base, not the slew
        drift_ppm = (clock.true_offset_ns() - before) / 0.5e9 * 1e6
        assert abs(drift_ppm) < 600, drift_ppm

    run(main, loop)


def test_fatal_clock_error_still_restores_the_base_frequency() -> None:
    """A clock write that fails mid-slew is fatal; the stop that follows still takes the
    slew off (the frequency write works; the status write is what is refused)."""

    class RefusesStatusMidSlew(SoftwareClock):
        def set_kernel_status(self, status: KernelStatus) -> None:
            if abs(self.correction_ppm) > 10_000:
                raise PermissionError(1, "clock_adjtime (set status) not permitted")
            super().set_kernel_status(status)

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = RefusesStatusMidSlew(40.0, 0.2)
        daemon = GuestDaemon(_settings(relay), clock, rng=random.Random(2))
        try:
            with pytest.raises(PermissionError):
                await asyncio.wait_for(daemon.run(asyncio.Event()), 10)
        finally:
            await relay.stop()
        assert abs(clock.correction_ppm) <= 500, clock.correction_ppm
        assert clock.correction_ppm == daemon.controller.base_frequency_ppm()[0]

    asyncio.run(main())


# --- warm restart -----------------------------------------------------------------------------


def test_restart_with_a_frequency_file_and_after_a_kill(tmp_path: Path) -> None:
    """Converge, stop cleanly (the file keeps the frequency), restart on the same clock: the
    transient stays within 2x the steady-state max offset + 100 us. Then a kill mid-run (the
    clock keeps whatever it held, the file is the last periodic write) and a restart: every
    synchronised status has a bound that covers the true offset."""
    path = str(tmp_path / "freq")

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = SoftwareClock(150.0, 0.02)
        settings = _settings(relay, freq_file=path, freq_file_interval_s=1.0)
        started: list[GuestDaemon] = []
        try:
            first = GuestDaemon(settings, clock, rng=random.Random(3))
            started.append(first)
            await first.start()
            await wait_for(lambda: first.status()["state"] == "synchronised"
                           and abs(clock.true_offset_ns()) < 200_000, timeout=20,
                           what="first guest converged")
            await asyncio.sleep(4)  # let the frequency settle
            steady = await _watch(first, clock, 4)
            await first.stop()
            record = load(path, clock.now_ns() / _NS, 3600)
            assert record is not None
            assert clock.correction_ppm == pytest.approx(record.frequency_ppm, abs=1e-3)

            second = GuestDaemon(settings, clock, rng=random.Random(4))
            started.append(second)
            assert second.start_frequency is not None
            assert second.start_frequency.reason == "frequency file"
            await second.start()
            restart = await _watch(second, clock, 5)
            steady_max = max(abs(t) for t, _ in steady)
            restart_max = max(abs(t) for t, _ in restart)
            print(f"steady max {steady_max * 1e6:.0f} us, after restart {restart_max * 1e6:.0f} us")
            # a sample is only as good as half its path delay: on a quiet machine that is
            # microseconds; two suites at once on 2 vCPUs gave replies milliseconds late and a
            # 4.6 ms transient (steady 9 us), which the bound covered
            worst_delay = max((src["delay_s"] or 0.0 for _, st in restart
                               for src in st["sources"]), default=0.0)
            assert restart_max <= 2 * steady_max + 100e-6 + worst_delay / 2, (
                steady_max, restart_max, worst_delay)
            assert not _uncovered(restart)

            _kill(second)  # as SIGKILL: no restore, no file at stop
            await second.stop()
            third = GuestDaemon(settings, clock, rng=random.Random(5))
            started.append(third)
            assert third.start_frequency is not None
            assert third.start_frequency.reason == "frequency file"
            await third.start()
            after_kill = await _watch(third, clock, 4)
            await third.stop()
            assert any(st["state"] == "synchronised" for _, st in after_kill)
            assert not _uncovered(after_kill), _uncovered(after_kill)[:5]
        finally:
            for daemon in started:  # a no-op for those the test stopped
                await daemon.stop()
            await relay.stop()

    asyncio.run(main())


@pytest.mark.parametrize(("native_ppm", "kept"), [(30.0, True), (150.0, True)])
def test_restart_without_a_file_keeps_or_resets_the_kernel_frequency(
        native_ppm: float, kept: bool) -> None:
    """Issue 9 item 4: a new controller assumed zero on a clock still holding the old
    correction and swung to -3.5 ms. A base within the kernel's 500 ppm leaves the tick
    nominal and is kept (150 ppm used to move it and was reset; a slew left by a kill still
    moves it: tests/test_clocks.py). Either way the new controller knows what the clock
    holds: no swing, and the frequency is found again."""

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = SoftwareClock(native_ppm, 0.01)
        started: list[GuestDaemon] = []
        try:
            first = GuestDaemon(_settings(relay), clock, rng=random.Random(6))
            started.append(first)
            await first.start()
            await wait_for(lambda: first.status()["state"] == "synchronised"
                           and abs(clock.true_offset_ns()) < 200_000, timeout=20,
                           what="first guest converged")
            await asyncio.sleep(2)
            await first.stop()
            held = clock.correction_ppm
            second = GuestDaemon(_settings(relay), clock, rng=random.Random(7))
            started.append(second)
            sf = second.start_frequency
            assert sf is not None and (sf.set_kernel is not kept)
            assert sf.ppm == (held if kept else 0.0)
            await second.start()
            # the controller's model holds what the clock holds (item 4: it assumed zero)
            assert second.controller.base_frequency_ppm()[0] == pytest.approx(
                clock.correction_ppm, abs=1e-6)
            trace = await _watch(second, clock, 5)
            await second.stop()
            assert clock.correction_ppm == second.controller.base_frequency_ppm()[0]
            worst = max(abs(t) for t, _ in trace)
            freq = trace[-1][1]["frequency_ppm"]
            print(f"native {native_ppm} ppm, kept={kept}: max |true| after restart "
                  f"{worst * 1e6:.0f} us, frequency {freq:.1f} ppm")
            # issue 9 item 4 swung to -3.5 ms; a quiet machine stays within a few hundred us,
            # two suites at once on 2 vCPUs reached 1.5 ms (inside the bound: asserted below)
            assert worst < 2.5e-3, worst
            assert abs(freq - native_ppm) < 25, freq  # item 4 estimated 335 ppm (true 150)
            assert not _uncovered(trace), _uncovered(trace)[:5]
        finally:
            for daemon in started:  # a no-op for those the test stopped
                await daemon.stop()
            await relay.stop()

    asyncio.run(main())
