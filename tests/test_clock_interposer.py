"""SystemClock resolves clock_adjtime in the process namespace, so an LD_PRELOAD interposer
sees every write: the real ctypes path, exercised without touching this machine's clock.

Three locks keep the real clock safe: the interposer never forwards a call; the child refuses
to write unless the interposer's marker symbol is visible; and the child runs with
CAP_SYS_TIME dropped from its bounding set, so a real call could only fail with EPERM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest_client.clocks import (
    ADJ_ESTERROR,
    ADJ_FREQUENCY,
    ADJ_MAXERROR,
    ADJ_NANO,
    ADJ_SETOFFSET,
    ADJ_STATUS,
    ADJ_TICK,
    SystemClock,
)

ROOT = Path(__file__).resolve().parent.parent

INTERPOSER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/timex.h>

int timesync_test_interposer_active = 1;

/* Record the call and report success; never reach the kernel. */
int clock_adjtime(clockid_t id, struct timex *tx) {
    const char *path = getenv("TIMESYNC_INTERPOSER_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) {
        fprintf(f, "%d %u %ld %ld %ld %ld %ld %ld %d\n", (int)id, tx->modes, tx->freq, tx->tick,
                (long)tx->time.tv_sec, (long)tx->time.tv_usec, tx->maxerror, tx->esterror,
                tx->status);
        fclose(f);
    }
    return 0;
}
"""

CHILD = """
import ctypes, sys
cap_eff = next(int(l.split()[1], 16) for l in open('/proc/self/status') if l.startswith('CapEff'))
if cap_eff & (1 << 25):  # CAP_SYS_TIME
    sys.exit(4)
try:
    ctypes.CDLL(None).timesync_test_interposer_active
except AttributeError:
    sys.exit(3)  # not interposed: refuse to write
from guest_client.clocks import SystemClock
from timesyncd.clock import KernelStatus
clock = SystemClock()
clock.set_frequency(150.0)
clock.step(250_000_000)
clock.set_kernel_status(KernelStatus(synchronised=True, maxerror_s=0.001, esterror_s=0.0005))
"""


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("setpriv")),
                    reason="needs gcc and setpriv (util-linux)")
def test_ld_preload_interposer_receives_every_write(tmp_path: Path) -> None:
    src = tmp_path / "interposer.c"
    lib = tmp_path / "libinterposer.so"
    log = tmp_path / "calls.log"
    src.write_text(INTERPOSER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   timeout=60)
    before = SystemClock().read()  # modes = 0: read only
    env = {**os.environ, "LD_PRELOAD": str(lib), "TIMESYNC_INTERPOSER_LOG": str(log),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["setpriv", "--bounding-set", "-sys_time", "--",
                           sys.executable, "-c", CHILD],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    calls = [list(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(calls) == 3, calls
    (freq_call, step_call, status_call) = calls
    # clock id 0 (CLOCK_REALTIME); 150 ppm split into tick (100 ppm per us) and scaled freq
    assert freq_call[0] == 0 and freq_call[1] == ADJ_FREQUENCY | ADJ_TICK
    ppm = (freq_call[3] - 10_000) * 100 + freq_call[2] / 65536
    assert ppm == pytest.approx(150.0, abs=1e-3)
    assert step_call[1] == ADJ_SETOFFSET | ADJ_NANO
    assert (step_call[4], step_call[5]) == (0, 250_000_000)  # tv_sec, tv_usec holds ns
    assert status_call[1] == ADJ_MAXERROR | ADJ_ESTERROR | ADJ_STATUS
    assert (status_call[6], status_call[7]) == (1000, 500)  # microseconds
    assert status_call[8] & 0x0040 == 0  # STA_UNSYNC cleared: synchronised
    after = SystemClock().read()
    assert (after.tick_us, after.freq_ppm) == (before.tick_us, before.freq_ppm)
