"""Read a process's CPU time and memory from /proc (Linux), for benchmark accounting."""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        data = fh.read()
    # fields after "(comm)": state ppid pgrp ... utime(12th) stime cutime cstime
    return data[data.rfind(")") + 2 :].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """utime + stime (and, if asked, of reaped children: cutime + cstime) in seconds."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])
    if reaped_children:
        ticks += int(f[13]) + int(f[14])
    return ticks / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid``, its reaped children and its live children (socat forks one per
    connection); a child that exits between the two reads is missed, which only undercounts."""
    total = cpu_seconds(pid, reaped_children=True)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = _stat_fields(int(name))
            if int(f[1]) == pid:
                total += (int(f[11]) + int(f[12])) / _TICK
        except (OSError, IndexError, ValueError):
            continue
    return total


def status_kib(pid: int, key: str = "VmRSS") -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM, ...) in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def sched_cpu_seconds(pid: int) -> float:
    """On-CPU time of all threads from /proc/PID/task/*/schedstat, in ns resolution (the
    tick-based utime+stime reads 0 for a process that runs a few ms a minute)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # thread exited between listing and reading
    return total / 1e9
