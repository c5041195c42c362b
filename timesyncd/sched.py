"""Optional real-time scheduling and memory locking for the relay and the guest daemon, as
chrony's ``sched_priority`` and ``lock_all``: off by default.

Why: a time stamp the kernel cannot take for us (the guest-facing stream sockets have no
receive stamps) is taken when the process runs, so a busy host turns run-queue waits into
path delay (measured: milliseconds with three busy loops on two cores, docs/BENCHMARKS.md).
SCHED_FIFO lets the daemon preempt ordinary work the moment its socket is readable; locking
its pages keeps a page fault (swap, reclaim) off that path too.

Granting them under systemd (docs/DEPLOYMENT.md): ``AmbientCapabilities=CAP_SYS_NICE
CAP_IPC_LOCK`` (or run as root), ``LimitRTPRIO=N`` for an unprivileged user, and
``LimitMEMLOCK=infinity``. A refusal is logged with the setting to change and the daemon runs
on without it: time service at normal priority beats no time service.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

MCL_CURRENT = 1
MCL_FUTURE = 2


@dataclass(frozen=True, slots=True)
class SchedResult:
    """What was granted: ``priority`` (0: normal scheduling) and ``locked``."""

    priority: int
    locked: bool


def apply(priority: int, lock_memory: bool, who: str) -> SchedResult:
    """Switch this process to SCHED_FIFO at ``priority`` (0: leave it) and lock all its pages
    if asked; failures are logged naming the key, never raised."""
    granted = 0
    if priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            granted = priority
            log.info("%s: SCHED_FIFO priority %d", who, priority,
                     extra={"event": "sched_priority", "priority": priority})
        except OSError as exc:
            log.warning("%s: sched_priority %d refused (%s); running at normal priority. "
                        "Grant CAP_SYS_NICE (systemd: AmbientCapabilities=CAP_SYS_NICE or "
                        "LimitRTPRIO=%d) or set sched_priority = 0", who, priority,
                        exc.strerror or exc, priority,
                        extra={"event": "sched_priority_refused"})
    locked = False
    if lock_memory:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
            locked = True
            log.info("%s: memory locked", who, extra={"event": "lock_memory"})
        else:
            err = ctypes.get_errno()
            log.warning("%s: lock_memory refused (%s); pages may be swapped out. Grant "
                        "CAP_IPC_LOCK or systemd LimitMEMLOCK=infinity, or set lock_memory = "
                        "false", who, os.strerror(err), extra={"event": "lock_memory_refused"})
    return SchedResult(granted, locked)
