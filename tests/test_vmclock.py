"""Issue 15: the VMClock reader against a fake device (a file with the kernel's layout, only
behind the testing flag), written with the seqcount protocol, torn writes included; and the
rate-limited watch of its disruption marker and generation counter."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from guest_client.disruption import VM_GENERATION, VMCLOCK_MARKER, Disruption, VmClockWatch
from guest_client.vmclock import (
    FLAG_VM_GEN_COUNTER_PRESENT,
    MAX_RETRIES,
    VmClockError,
    VmClockReader,
    check_path,
    encode_page,
)
from guest_client.vmclock_watch import VmClockMonitor, open_monitor
from tests.loops import LOOPS, run

SEQ, MARKER, GEN = 12, 16, 104


def fake(tmp_path: Path, **fields: int) -> Path:
    path = tmp_path / "vmclock0"
    path.write_bytes(encode_page(**fields))
    return path


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack(fmt, value), offset)
    finally:
        os.close(fd)


def test_reads_the_kernel_layout(tmp_path: Path) -> None:
    path = fake(tmp_path, seq=4, marker=0xDEADBEEF12345678, generation=7, leap=1,
                clock_status=3)
    r = VmClockReader(str(path), allow_regular_file=True)
    snap = r.read()
    assert (snap.seq, snap.disruption_marker, snap.vm_generation) == (4, 0xDEADBEEF12345678, 7)
    assert (snap.status_name, snap.leap_name) == ("freerunning", "pre_pos")
    r.close()
    # without VM_GEN_COUNTER_PRESENT the counter is not a counter
    path = fake(tmp_path, generation=7, flags=0)
    assert VmClockReader(str(path), allow_regular_file=True).read().vm_generation is None


def test_path_must_be_a_character_device_unless_testing(tmp_path: Path) -> None:
    path = fake(tmp_path)
    with pytest.raises(VmClockError, match="not a character device.*vmclock_testing_file"):
        check_path(str(path))
    check_path("/dev/null")  # a character device is accepted (never mapped here)
    with pytest.raises(VmClockError, match="cannot open"):
        check_path(str(tmp_path / "absent"))
    # the default path absent means "no VMClock", an explicit one is an error
    assert open_monitor("/dev/vmclock0" if not os.path.exists("/dev/vmclock0") else "",
                        False, 60.0, lambda d: None) is None
    with pytest.raises(VmClockError):
        open_monitor(str(tmp_path / "absent"), True, 60.0, lambda d: None)


@pytest.mark.parametrize(("fields", "message"), [
    ({"magic": 0x12345678}, "bad magic"),
    ({"version": 2}, "unsupported ABI version 2"),
    ({"size": 64}, "region size 64"),
])
def test_refuses_what_is_not_a_vmclock_page(tmp_path: Path, fields: dict[str, int],
                                           message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(encode_page(**fields).ljust(4096, b"\0"))
    with pytest.raises(VmClockError, match=message):
        VmClockReader(str(path), allow_regular_file=True)
    short = tmp_path / "short"
    short.write_bytes(encode_page()[:50])
    with pytest.raises(VmClockError, match="shorter than the ABI"):
        VmClockReader(str(short), allow_regular_file=True)


def test_update_in_progress_is_retried_and_a_stuck_one_is_an_error(tmp_path: Path) -> None:
    path = fake(tmp_path, seq=5, marker=1)  # odd: the hypervisor is mid-update
    r = VmClockReader(str(path), allow_regular_file=True)
    with pytest.raises(VmClockError, match="never settled"):
        r.read()
    assert r.torn_reads == MAX_RETRIES
    poke(path, SEQ, "<I", 6)
    assert r.read().seq == 6


def test_torn_writes_are_never_returned(tmp_path: Path) -> None:
    """A writer thread updates marker and generation (always equal when consistent) with the
    seqcount protocol and yields mid-update; no read may see a mixed pair."""
    path = fake(tmp_path, seq=0, marker=0, generation=0)
    stop = threading.Event()

    def writer() -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            seq = 0
            while not stop.is_set():
                os.pwrite(fd, struct.pack("<I", seq + 1), SEQ)
                os.pwrite(fd, struct.pack("<Q", seq // 2 + 1), MARKER)
                os.sched_yield()
                os.pwrite(fd, struct.pack("<Q", seq // 2 + 1), GEN)
                seq += 2
                os.pwrite(fd, struct.pack("<I", seq), SEQ)
                time.sleep(0.0002)  # mostly settled, as a real page is
        finally:
            os.close(fd)

    r = VmClockReader(str(path), allow_regular_file=True)
    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = set()
        deadline = time.monotonic() + 5.0  # bounded; usually done in well under a second
        while time.monotonic() < deadline and not (len(seen) > 10 and r.torn_reads):
            os.sched_yield()  # let the writer run between (and during) reads
            try:
                snap = r.read()
            except VmClockError:
                continue  # the writer held it odd for MAX_RETRIES reads: not a torn value
            assert snap.disruption_marker == snap.vm_generation == snap.seq // 2, snap
            seen.add(snap.seq)
    finally:
        stop.set()
        t.join(5)
    assert len(seen) > 10 and r.torn_reads > 0  # reads really overlapped updates


def snap_of(marker: int, gen: int):  # type: ignore[no-untyped-def]
    from guest_client.vmclock import VmClockSnapshot

    return VmClockSnapshot(0, marker, FLAG_VM_GEN_COUNTER_PRESENT, 2, 0, gen)


def test_watch_acts_once_per_interval_and_never_drops_a_change() -> None:
    w = VmClockWatch(min_interval_s=60.0)
    assert w.observe(0.0, snap_of(1, 1)) is None  # baseline
    assert w.observe(1.0, snap_of(1, 1)) is None
    d = w.observe(2.0, snap_of(2, 1))
    assert d is not None and (d.cause, d.clone) == (VMCLOCK_MARKER, False)
    # a storm: 50 flips inside the interval: counted, not acted on
    for i in range(50):
        assert w.observe(3.0 + i * 0.5, snap_of(100 + i, 2 + i)) is None
    assert (w.resets, w.rate_limited) == (1, 50)
    # after the interval, the last state is acted on once (a restore inside a storm counts)
    d = w.observe(62.5, snap_of(149, 51))
    assert d is not None and (d.cause, d.clone) == (VM_GENERATION, True)
    assert w.observe(63.0, snap_of(149, 51)) is None
    assert w.resets == 2
    # flipping back to the values acted on is no new disruption
    w2 = VmClockWatch(min_interval_s=60.0)
    w2.observe(0.0, snap_of(1, 1))
    w2.observe(100.0, snap_of(2, 1))
    w2.observe(101.0, snap_of(3, 1))
    assert w2.observe(102.0, snap_of(2, 1)) is None


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_monitor_acts_on_a_marker_change_and_rate_limits_a_storm(tmp_path: Path,
                                                                 loop_kind: str) -> None:
    """The daemon's monitor over a fake device: one disruption for a change, one for a storm
    of 200 flips inside the interval (the rest counted), the mapping closed on stop."""
    path = fake(tmp_path, seq=2, marker=1, generation=1)
    seen: list[Disruption] = []

    async def main() -> None:
        reader = VmClockReader(str(path), allow_regular_file=True)
        mon = VmClockMonitor(reader, seen.append, min_interval_s=30.0, poll_s=0.01)
        await mon.start()
        try:
            poke(path, MARKER, "<Q", 2)
            for _ in range(200):
                await asyncio.sleep(0.05 if not seen else 0.002)
                if seen:
                    poke(path, GEN, "<Q", 2 + len(seen) + _)  # the storm: generation flips
            assert [d.cause for d in seen] == [VMCLOCK_MARKER]
            st = mon.status()
            assert st["resets"] == 1 and st["rate_limited"] >= 10 and st["errors"] == 0
        finally:
            await mon.stop()
        with pytest.raises(ValueError):
            reader._map[0]  # closed

    run(main, loop_kind)
