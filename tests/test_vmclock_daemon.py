"""Issue 15, end to end in the daemon: a fake VMClock device (a file behind the testing flag),
a software clock set back by the pause, a relay whose connection the restore resets. The guest
is disrupted at once (status, kernel, ClockBound Disrupted with VMClock's marker), resets its
relay link on the generation change, steps once when the sources confirm, then tracks again."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from pathlib import Path

import pytest
from guest_fakes import FakeRelay
from loops import LOOPS, run
from test_clockbound import spec_read

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from guest_client.vmclock import encode_page
from timesyncd.clockbound import ClockStatus

PAUSE_S = 3600


def segment_status(path: str) -> int | None:
    """The segment's status, None if the read met the writer mid-update too often (spec_read
    spins with the GIL held; under load the writer thread may not get to finish)."""
    try:
        return spec_read(path)["status"]
    except AssertionError:
        return None


async def until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("loop", LOOPS)
def test_restore_with_vmclock_is_disrupted_then_stepped_once(tmp_path: Path, loop: str) -> None:
    dev = tmp_path / "vmclock0"
    dev.write_bytes(encode_page(seq=2, marker=11, generation=1))
    shm = str(tmp_path / "shm0")

    async def main() -> None:
        relay = FakeRelay()
        await relay.start()
        clock = SoftwareClock(20.0, 0.0)
        settings = GuestSettings(relay=relay.address, clock="software", status_socket="",
                                 clockbound_shm=shm, vmclock=str(dev), vmclock_testing_file=True,
                                 minpoll=-1, maxpoll=0, burst=2, reconnect_min_s=0.05,
                                 reconnect_max_s=0.1)
        daemon = GuestDaemon(settings, clock, rng=random.SystemRandom())
        await daemon.start()
        try:
            limit = daemon.controller.config.step_limit  # past the boot steps
            await until(lambda: daemon.status()["state"] == "synchronised"
                        and daemon.controller.updates > limit, 30, "sync")
            assert daemon.status()["vmclock"]["clock_status"] == "synchronized"
            connects = daemon.link.connects if daemon.link else 0
            # the restore: the clock stood still for the pause, the page says so
            clock._anchor_reading -= PAUSE_S * 1_000_000_000
            fd = os.open(dev, os.O_RDWR)
            try:  # seqcount protocol: odd, fields, even
                os.pwrite(fd, struct.pack("<I", 3), 12)
                os.pwrite(fd, struct.pack("<Q", 12), 16)
                os.pwrite(fd, struct.pack("<Q", 2), 104)
                os.pwrite(fd, struct.pack("<I", 4), 12)
            finally:
                os.close(fd)
            await until(lambda: daemon.status()["state_reason"] == "disrupted", 5,
                        "disrupted")
            st = daemon.status()
            # not yet confirmed (polls are 0.5 s apart, three agreeing samples needed after
            # the disruption): everything says disrupted
            assert not daemon.controller.steps
            assert st["disrupted"] and st["state"] == "unsynchronised"
            assert clock.kernel_status is not None
            assert not clock.kernel_status.synchronised
            assert clock.kernel_status.maxerror_s >= 16.0
            await until(lambda: segment_status(shm) == ClockStatus.DISRUPTED, 2,
                        "segment says Disrupted")
            seg: dict[str, int] = {}

            def marker_seen() -> bool:
                try:
                    seg.update(spec_read(shm))
                except AssertionError:  # met the writer mid-update: next tick
                    return False
                return True

            await until(marker_seen, 2, "segment readable")
            assert seg["disruption_marker"] == 12 and seg["disruption_support"] == 1
            await until(lambda: daemon.controller.steps == 1
                        and daemon.status()["state"] == "synchronised", 20, "stepped")
            assert abs(clock.true_offset_ns()) < 50_000_000  # type: ignore[operator]
            st = daemon.status()
            assert st["disruptions"] == 1 and st["vmclock"]["vm_generation"] == 2
            assert "confirmed after a" in st["step_decision"]
            assert daemon.link is not None and daemon.link.counters["reset"] == 1
            assert daemon.link.connects > connects  # the link came back by itself
            await until(lambda: segment_status(shm) == ClockStatus.SYNCHRONIZED, 5,
                        "segment says Synchronized again")
            assert daemon.controller.steps == 1 and len(clock.steps) == 1
        finally:
            await daemon.stop()
            await relay.stop()

    run(main, loop)
