"""Open a shared-memory segment file safely, as root, in a directory others may write to.

The daemon runs as root and the segment lives under a shared directory (ClockBound's default
is ``/var/run/clockbound``); whoever else can write there must not be able to make it
overwrite another file or share the segment unnoticed. So: the last path component is never
followed if it is a symlink (``O_NOFOLLOW``), the file must be a regular file with one link
(no hard link to, say, ``/etc/shadow``) owned by us, an exclusive ``flock`` keeps a second
``timesync guest`` out, a process that maps it writable (a real ClockBound daemon does not
lock) is found in ``/proc/*/maps`` and named, the file is grown but never shrunk (a reader
touching a mapping past the end of a truncated file gets SIGBUS), and its mode is 0644:
readable by applications, writable only by the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import suppress

MODE = 0o644


class SegmentFileError(OSError):
    """The segment file cannot be used safely; the message says why and what to do."""


def open_segment_file(path: str, size: int) -> int:
    """A locked, read-write descriptor on ``path``, at least ``size`` bytes long."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentFileError(
                f"clockbound_shm: {path} is a symlink; refusing to follow it (remove it, or "
                "point clockbound_shm at the real file)") from None
        raise SegmentFileError(f"clockbound_shm: cannot open {path}: {exc.strerror}") from None
    try:
        _check(path, fd, size)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check(path: str, fd: int, size: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentFileError(f"clockbound_shm: {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise SegmentFileError(
            f"clockbound_shm: {path} is owned by uid {st.st_uid}, not by this daemon (uid "
            f"{os.geteuid()}); someone else created it: remove it or choose another path")
    if st.st_nlink != 1:
        raise SegmentFileError(
            f"clockbound_shm: {path} has {st.st_nlink} hard links; refusing to write through "
            "a link to another file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SegmentFileError(
            f"clockbound_shm: {path} is locked by another writer "
            f"({describe(lock_holders(st))}); stop it or choose another path") from None
    writers = mapped_writable_by(st)
    if writers:
        raise SegmentFileError(
            f"clockbound_shm: {path} is already written by {describe(writers)} (a ClockBound "
            "daemon?); two writers would corrupt it: stop it or choose another path")
    if stat.S_IMODE(st.st_mode) != MODE:
        os.fchmod(fd, MODE)
    if st.st_size < size:
        os.ftruncate(fd, size)  # grows only: never shrink a file readers may have mapped


def lock_holders(st: os.stat_result) -> list[int]:
    """Pids holding a ``flock`` on the file of ``st`` (from ``/proc/locks``)."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    with suppress(OSError), open("/proc/locks") as fh:
        for line in fh:
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF" (blocked waiters have "->")
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                with suppress(ValueError):
                    pids.append(int(parts[4]))
    return pids


def mapped_writable_by(st: os.stat_result, exclude: int | None = None) -> list[int]:
    """Pids (other than ours and ``exclude``) with a writable shared mapping of the file."""
    me = os.getpid()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (me, exclude):
            continue
        with suppress(OSError), open(f"/proc/{entry}/maps") as fh:
            for line in fh:
                f = line.split(maxsplit=5)
                # "start-end rw-s offset dev inode path"
                if len(f) >= 5 and f[4] == str(st.st_ino) and f[3] == dev and "w" in f[1]:
                    found.append(int(entry))
                    break
    return found


def describe(pids: list[int]) -> str:
    """``pid 42 (clockbound)``, for error messages."""
    if not pids:
        return "an unknown process"
    names = []
    for pid in pids:
        comm = "?"
        with suppress(OSError), open(f"/proc/{pid}/comm") as fh:
            comm = fh.read().strip()
        names.append(f"pid {pid} ({comm})")
    return ", ".join(names)
