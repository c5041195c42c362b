"""Optional SCHED_FIFO priority and memory locking (issue 18, like chrony's sched_priority and
lock_all): off by default, applied when asked. Only in a relay process this test starts and
kills: never on the test runner itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest_client.settings import GuestSettings
from host_relay.settings import RelaySettings
from timesyncd import sched

TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]


def _vm_locked_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def test_off_by_default() -> None:
    for cls in (RelaySettings, GuestSettings):
        s = cls()
        assert s.sched_priority == 0 and s.lock_memory is False
    assert sched.apply(0, False, "test") == sched.SchedResult(0, False)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_SYS_NICE and CAP_IPC_LOCK")
def test_relay_runs_at_the_asked_priority_with_its_memory_locked(tmp_path: Path) -> None:
    sock = tmp_path / "relay.sock"
    proc = subprocess.Popen([*TIMESYNC, "relay", "--listen", f"unix:{sock}",
                             "--sched-priority", "1", "--lock-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert os.sched_getscheduler(proc.pid) == os.SCHED_FIFO
        assert os.sched_getparam(proc.pid).sched_priority == 1
        assert _vm_locked_kb(proc.pid) > 1000
    finally:
        proc.kill()
        proc.wait(5)
        assert proc.stderr is not None
        proc.stderr.close()
