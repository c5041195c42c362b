"""Clean stop and restart through the real ``timesync guest --clock system`` process, with
``clock_adjtime`` interposed by a fake kernel that keeps its state in a file: the "kernel"
outlives the process as a real one does, so SIGTERM, SIGKILL and the start rule are seen from
outside, on the real ctypes path.

The machine's clock is never written (as in ``test_clock_interposer.py``): the interposer never
forwards a call, the child refuses to run unless the interposer's marker symbol is visible, and
it runs with CAP_SYS_TIME dropped from its bounding set, so a real write could only fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_fakes import FakeRelay
from loops import LOOPS

from guest_client.clocks import ADJ_FREQUENCY
from guest_client.freq_file import load

ROOT = Path(__file__).resolve().parent.parent

FAKE_KERNEL = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/timex.h>

int timesync_test_interposer_active = 1;

/* A kernel clock's adjustable state, kept in $TIMESYNC_FAKE_KERNEL across processes; every
   call is logged to $TIMESYNC_INTERPOSER_LOG. Never reaches the real kernel. */
int clock_adjtime(clockid_t id, struct timex *tx) {
    const char *state_path = getenv("TIMESYNC_FAKE_KERNEL");
    const char *log_path = getenv("TIMESYNC_INTERPOSER_LOG");
    long tick = 10000, freq = 0, maxerror = 16000000, esterror = 16000000;
    int status = 0x40;
    FILE *f = state_path ? fopen(state_path, "r") : NULL;
    if (f) {
        if (fscanf(f, "%ld %ld %d %ld %ld", &tick, &freq, &status, &maxerror, &esterror) != 5) {
            tick = 10000; freq = 0; status = 0x40;
        }
        fclose(f);
    }
    if (tx->modes & ADJ_TICK) tick = tx->tick;
    if (tx->modes & ADJ_FREQUENCY) freq = tx->freq;
    if (tx->modes & ADJ_STATUS) status = tx->status;
    if (tx->modes & ADJ_MAXERROR) maxerror = tx->maxerror;
    if (tx->modes & ADJ_ESTERROR) esterror = tx->esterror;
    if (tx->modes && state_path) {  /* replaced atomically: a SIGKILL cannot tear it */
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", state_path);
        if ((f = fopen(tmp, "w"))) {
            fprintf(f, "%ld %ld %d %ld %ld\n", tick, freq, status, maxerror, esterror);
            fclose(f);
            rename(tmp, state_path);
        }
    }
    if (log_path && (f = fopen(log_path, "a"))) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        fprintf(f, "%lld %u %ld %ld\n", (long long)now.tv_sec * 1000000000LL + now.tv_nsec,
                tx->modes, tick, freq);
        fclose(f);
    }
    tx->tick = tick; tx->freq = freq; tx->status = status;
    tx->maxerror = maxerror; tx->esterror = esterror;
    return 0;
}
"""

CHILD = """
import ctypes, sys
cap_eff = next(int(l.split()[1], 16) for l in open('/proc/self/status') if l.startswith('CapEff'))
if cap_eff & (1 << 25):  # CAP_SYS_TIME: refuse, a real write could succeed
    sys.exit(4)
try:
    ctypes.CDLL(None).timesync_test_interposer_active
except AttributeError:
    sys.exit(3)  # not interposed: refuse to run
import guest_client.daemon
guest_client.daemon._has_cap_sys_time = lambda: True  # the fake kernel grants every write
from timesyncd.cli import main
main(sys.argv[1:], prog_name="timesync")
"""


def ppm_of(tick: int, freq: int) -> float:
    return (tick - 10_000) * 100 + freq / 65536


@pytest.fixture(scope="module")
def fake_kernel_lib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not (shutil.which("gcc") and shutil.which("setpriv")):
        pytest.skip("needs gcc and setpriv (util-linux)")
    if os.sysconf("SC_CLK_TCK") != 100:
        pytest.skip("the fake kernel's nominal tick is 10000 us (USER_HZ=100)")
    tmp = tmp_path_factory.mktemp("fake-kernel")
    (tmp / "k.c").write_text(FAKE_KERNEL)
    lib = tmp / "libfakekernel.so"
    import subprocess
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp / "k.c")], check=True,
                   timeout=60)
    yield lib


class Kernel:
    """The fake kernel's state and call log, read from the test."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "kernel.state"
        self.log = tmp / "calls.log"

    def ppm(self) -> float | None:
        try:
            tick, freq, *_ = (int(v) for v in self.state.read_text().split())
        except (FileNotFoundError, ValueError):
            return None
        return ppm_of(tick, freq)

    def tick_nominal(self) -> bool:
        return int(self.state.read_text().split()[0]) == 10_000

    def timed_writes(self) -> list[tuple[int, float]]:
        """(CLOCK_MONOTONIC ns, total ppm) of every frequency write, in order."""
        out = []
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            parts = line.split()
            if len(parts) != 4:
                continue  # a line being written
            mono, modes, tick, freq = (int(v) for v in parts)
            if modes & ADJ_FREQUENCY:
                out.append((mono, ppm_of(tick, freq)))
        return out

    def frequency_writes(self) -> list[float]:
        return [ppm for _, ppm in self.timed_writes()]

    def corrected_ns(self, now_mono: int) -> int:
        """How far the corrections applied so far moved the guest clock (the machine clock
        stands in for it, unmoved): the integral of the kernel's frequency over time."""
        total = 0.0
        writes = self.timed_writes()
        ends = [t for t, _ in writes[1:]] + [now_mono]
        for (t0, ppm), t1 in zip(writes, ends[:len(writes)], strict=True):
            # a correction c makes the clock run (1 + c) times its own rate: against a clock
            # that stands still that is c / (1 + c) per second (c alone was 6,400 ppm off
            # mid-slew at 83,333 ppm, and warm samples let the guest learn the difference)
            c = ppm * 1e-6
            total += c / (1.0 + c) * (t1 - t0)
        return round(total)


class KernelRelay(FakeRelay):
    """A fake relay whose reference starts ``offset_ns`` ahead of the machine clock and moves
    against it by what the fake kernel's corrections did: to the guest, its clock really
    slews, with or without a guest running, as a kernel clock does."""

    def __init__(self, kernel: Kernel, offset_ns: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.offset_ns = offset_ns

    def _answer(self, frame: Any, writer: asyncio.StreamWriter) -> None:
        self.shift_ns = self.offset_ns - self.kernel.corrected_ns(time.monotonic_ns())
        super()._answer(frame, writer)


async def start_guest(lib: Path, kernel: Kernel, relay: FakeRelay, loop: str, *extra: str,
                      ) -> asyncio.subprocess.Process:
    env = {**os.environ, "LD_PRELOAD": str(lib), "TIMESYNC_FAKE_KERNEL": str(kernel.state),
           "TIMESYNC_INTERPOSER_LOG": str(kernel.log), "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        "setpriv", "--bounding-set", "-sys_time", "--", sys.executable, "-c", CHILD,
        "--loop", loop, "guest", "--clock", "system", "--relay", relay.address,
        "--status-socket", "", "--health-interval-s", "0", "--minpoll", "-1", "--maxpoll", "0",
        "--burst", "2", "--name", "cli-lifecycle", *extra,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def until_writes(proc: asyncio.subprocess.Process, kernel: Kernel, after: int,
                       count: int, slewing: bool = True) -> None:
    """Wait for ``count`` frequency writes past write number ``after``, the last a slew
    (|f| > 1,000 ppm) when ``slewing``."""
    for _ in range(300):
        writes = kernel.frequency_writes()[after:]
        if len(writes) >= count and (not slewing or abs(writes[-1]) > 1_000):
            return
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    err = await proc.stderr.read() if proc.stderr else b""  # type: ignore[union-attr]
    raise AssertionError(f"guest never got there (rc {proc.returncode}): {err.decode()[-2000:]}"
                         f"; writes {kernel.frequency_writes()[after:]}")


async def end(proc: asyncio.subprocess.Process, sig: signal.Signals) -> int:
    proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), 15)


async def left_base(proc: asyncio.subprocess.Process) -> float:
    """The base frequency a stopped guest says it left on the clock (its last log line).

    Compared with the fake kernel rather than with a fixed range: how far a few samples'
    estimate is from the truth depends on the machine's load (1 ms of scheduling delay over
    a 1 s poll is 1,000 ppm), which is not what these tests are about."""
    err = (await proc.stderr.read()).decode() if proc.stderr else ""  # type: ignore[union-attr]
    said = re.findall(r"clock left at its base frequency ([-+][0-9.]+) ppm", err)
    assert said, f"no stop line in the guest's log: {err[-2000:]}"
    return float(said[-1])


@pytest.mark.parametrize("loop", LOOPS)
def test_sigterm_sigkill_and_restart_through_the_cli(fake_kernel_lib: Path, tmp_path: Path,
                                                      loop: str) -> None:
    """SIGTERM mid-slew leaves the base frequency (and the file); a restart with the file
    starts from it; SIGKILL leaves the slew on the kernel, and a restart without a file
    resets it (tick off nominal) instead of modelling it as zero."""
    kernel = Kernel(tmp_path)
    freq_path = tmp_path / "freq"

    async def main() -> None:
        relay = KernelRelay(kernel, 100_000_000)  # the reference is 100 ms ahead: slew
        await relay.start()
        procs: list[asyncio.subprocess.Process] = []
        try:
            # 1. SIGTERM mid-slew: the base frequency is back on the kernel, and kept in the file
            procs.append(proc := await start_guest(fake_kernel_lib, kernel, relay, loop,
                                                   "--freq-file", str(freq_path)))
            await until_writes(proc, kernel, 0, 3)  # updates: a frequency estimate to keep
            slew = kernel.frequency_writes()[-1]
            assert await end(proc, signal.SIGTERM) == 0
            base = kernel.ppm()
            assert base is not None and base == pytest.approx(await left_base(proc), abs=1e-3)
            assert abs(base - slew) > 100, (base, slew)  # the slew is gone, the base stays
            record = load(str(freq_path), time.time(), 3600)
            assert record is not None and record.frequency_ppm == pytest.approx(base, abs=1e-3)

            # 2. restart with the file: its frequency is the first write; then SIGKILL mid-slew
            n = len(kernel.frequency_writes())
            procs.append(proc := await start_guest(fake_kernel_lib, kernel, relay, loop,
                                                   "--freq-file", str(freq_path)))
            await until_writes(proc, kernel, n, 2)
            assert kernel.frequency_writes()[n] == pytest.approx(record.frequency_ppm, abs=1e-3)
            assert await end(proc, signal.SIGKILL) == -signal.SIGKILL
            left = kernel.ppm()
            assert left is not None and abs(left) > 1_000  # a kill leaves the slew, as a kernel
            await asyncio.sleep(0.3)  # and it keeps slewing, guest or not

            # 3. restart without a file: the slew left behind (tick off nominal) is reset to 0
            n = len(kernel.frequency_writes())
            procs.append(proc := await start_guest(fake_kernel_lib, kernel, relay, loop))
            await until_writes(proc, kernel, n, 2, slewing=False)
            assert kernel.frequency_writes()[n] == 0.0
            assert await end(proc, signal.SIGTERM) == 0
            said = await left_base(proc)
            assert kernel.ppm() == pytest.approx(said, abs=1e-3)
            assert kernel.tick_nominal() is (abs(said) < 50)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            await relay.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
