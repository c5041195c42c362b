"""Bounded time for applications: read the ClockBound segment the guest daemon publishes.

``timesync guest --clockbound-shm PATH`` publishes ClockBound's shared-memory segment
(protocol version 2, ``docs/CLOCKBOUND.md``): a bound on ``|clock - true time|`` at an as-of
instant, the maximum drift that widens it afterwards, and a status. This module reads it
lock-free (no socket round trip per call) and imports only the standard library, so an
application pulls in neither the daemon nor any third-party package::

    from timesyncd import clockbound
    clock = clockbound.BoundedClock()          # maps /var/run/clockbound/shm0
    t = clock.now()                            # t.earliest_ns <= true time <= t.latest_ns
    clock.check_window(claims["nbf"], claims["exp"]).verdict  # "valid"/"invalid"/"uncertain"

Existing ClockBound clients (Rust, C, Go...) read the same segment unchanged.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DEFAULT_PATH", "BoundedClock", "ClockStatus", "Now", "SegmentError", "Snapshot",
    "WindowCheck", "check_header", "check_window", "widen",
]

#: ClockBound's default segment path (protocol version 2).
DEFAULT_PATH = "/var/run/clockbound/shm0"
#: The magic, as ClockBound writes and compares it: two native-endian u32 values.
MAGIC = (0x414D5A4E, 0x43420200)
VERSION = 2
#: Header: magic (2 x u32), segment size (u32), version (u16), generation (u16).
HEADER = struct.Struct("@IIIHH")
#: Body: as-of and void-after (timespec: i64 s, i64 ns), bound ns (i64), disruption marker
#: (u64), max drift ppb (u32), clock status (i32), disruption support (u8), 7 padding bytes.
BODY = struct.Struct("@qqqqqQIiB7x")
SEGMENT = struct.Struct("@IIIHHqqqqqQIiB7x")
SEGMENT_SIZE = SEGMENT.size  # 80
GENERATION_OFFSET = 14
#: ``CLOCK_MONOTONIC_COARSE`` (Linux): the clock of as-of and void-after.
CLOCK_MONOTONIC_COARSE = 6
_NS = 1_000_000_000
_BILLION = 1_000_000_000
#: Longest wait for a first consistent copy (a write takes two membarrier calls, ~10 ms).
_STABLE_WAIT_S = 1.0
#: now_ns() reuses a bound widened to the end of a step this long (ns of CLOCK_MONOTONIC).
_BUCKET_NS = 1_000_000
#: ClockBound readers tolerate as-of this far in their future (coarse clock granularity).
_CAUSALITY_BLUR_NS = 1000


class ClockStatus(enum.IntEnum):
    """ClockBound's clock status values (names as its protocol document spells them)."""

    UNKNOWN = 0
    SYNCHRONIZED = 1
    FREE_RUNNING = 2
    DISRUPTED = 3


class SegmentError(OSError):
    """The segment is missing, not initialised, malformed or of another protocol version."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent copy of the segment's body (times in ns of ``CLOCK_MONOTONIC_COARSE``)."""

    generation: int
    as_of_ns: int
    void_after_ns: int
    bound_ns: int
    max_drift_ppb: int
    status: ClockStatus
    disruption_marker: int = 0
    disruption_support: bool = False


_UNWRITTEN = Snapshot(0, 0, 0, 0, 0, ClockStatus.UNKNOWN)
_LIVE = (ClockStatus.SYNCHRONIZED, ClockStatus.FREE_RUNNING)
_new_tuple = tuple.__new__
_monotonic_ns = time.monotonic_ns


class Now(NamedTuple):
    """The interval that contains true time (Unix ns) and the clock's status when read."""

    earliest_ns: int
    latest_ns: int
    status: ClockStatus

    @property
    def earliest(self) -> float:
        return self.earliest_ns / _NS

    @property
    def latest(self) -> float:
        return self.latest_ns / _NS

    @property
    def bound_ns(self) -> int:
        return (self.latest_ns - self.earliest_ns) // 2


@dataclass(frozen=True, slots=True)
class WindowCheck:
    """``verdict``: "valid" (certainly inside), "invalid" (certainly outside) or "uncertain";
    ``reason`` says why it is not valid ("" when valid)."""

    verdict: str
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.verdict == "valid"


def check_header(buf: bytes | bytearray | memoryview) -> int:
    """Validate magic, version and segment size; returns the generation."""
    if len(buf) < HEADER.size:
        raise SegmentError("segment not initialised (shorter than its header)")
    m0, m1, size, version, gen = HEADER.unpack_from(buf, 0)
    if (m0, m1) != MAGIC:
        raise SegmentError("not a ClockBound segment (bad magic)")
    if version != VERSION:
        raise SegmentError(f"segment version {version}, this reader speaks {VERSION}"
                           if version else "segment not initialised (version 0)")
    if size < SEGMENT_SIZE:
        raise SegmentError(f"segment size field {size} is under {SEGMENT_SIZE}")
    return int(gen)


def _body(gen: int, f: tuple[int, ...]) -> Snapshot:
    try:
        status = ClockStatus(f[7])
    except ValueError:
        raise SegmentError(f"unknown clock status {f[7]}") from None
    if f[6] >= _BILLION:
        raise SegmentError(f"max drift {f[6]} ppb is not below 1e9: malformed")
    return Snapshot(gen, f[0] * _NS + f[1], f[2] * _NS + f[3], f[4], f[6], status, f[5],
                    bool(f[8]))


def widen(snap: Snapshot, mono_ns: int) -> tuple[int, ClockStatus]:
    """The bound at ``mono_ns`` (CLOCK_MONOTONIC_COARSE) and the status a reader then sees:
    the bound grows by max drift x time since as-of; past void-after the status is UNKNOWN;
    an as-of in the reader's future (other than by coarse granularity) is UNKNOWN too."""
    elapsed = mono_ns - snap.as_of_ns
    status = snap.status
    if elapsed < 0:
        if elapsed < -_CAUSALITY_BLUR_NS:
            status = ClockStatus.UNKNOWN
        elapsed = 0
    elif mono_ns >= snap.void_after_ns and status in _LIVE:
        status = ClockStatus.UNKNOWN
    return snap.bound_ns + -(-elapsed * snap.max_drift_ppb // _BILLION), status


def check_window(
    t: Now, not_before: float | None, not_after: float | None, *, leeway_s: float = 0.0,
    accept_possibly_expired: bool = False, accept_possibly_early: bool = False,
) -> WindowCheck:
    """Is every instant of ``t`` inside [not_before - leeway, not_after + leeway] (Unix s)?

    Fails closed: a bound that straddles ``not_after`` is "uncertain" (the token may have
    expired) unless ``accept_possibly_expired``; likewise ``not_before`` with
    ``accept_possibly_early``. An unknown or disrupted clock is always "uncertain"."""
    if t.status not in (ClockStatus.SYNCHRONIZED, ClockStatus.FREE_RUNNING):
        return WindowCheck("uncertain", f"clock_{t.status.name.lower()}")
    lee = round(leeway_s * _NS)
    if not_after is not None:
        end = round(not_after * _NS) + lee
        if t.earliest_ns > end:
            return WindowCheck("invalid", "expired")
        if t.latest_ns > end and not accept_possibly_expired:
            return WindowCheck("uncertain", "may_be_expired")
    if not_before is not None:
        start = round(not_before * _NS) - lee
        if t.latest_ns < start:
            return WindowCheck("invalid", "not_yet_valid")
        if t.earliest_ns < start and not accept_possibly_early:
            return WindowCheck("uncertain", "may_not_be_valid_yet")
    return WindowCheck("valid")


class BoundedClock:
    """A read-only mapping of the segment at ``path``; cheap to call, not thread-safe per
    instance (one per thread, or a lock). ``realtime_ns`` reads the clock the segment
    describes: ``CLOCK_REALTIME`` with ``clock = system``; tests of the software clock pass
    that clock's reading instead."""

    def __init__(self, path: str = DEFAULT_PATH, *,
                 realtime_ns: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._realtime_ns = realtime_ns
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, HEADER.size, 0)
            check_header(head)
            size = HEADER.unpack(head)[2]
            if os.fstat(fd).st_size < size:
                raise SegmentError(f"{path}: file is shorter than its segment size {size}")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except SegmentError as exc:
            raise SegmentError(f"{path}: {exc}") from None
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self._gen = self._view[GENERATION_OFFSET:GENERATION_OFFSET + 2].cast("H")
        self._snap_gen = -1
        self._snap: Snapshot | None = None
        # now_ns() reuses _bound and _status while CLOCK_MONOTONIC < _until
        self._until = 0
        self._bound = 0
        self._status = ClockStatus.UNKNOWN

    def close(self) -> None:
        self._gen.release()
        self._view.release()
        self._map.close()

    def __enter__(self) -> BoundedClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> Snapshot:
        """A consistent copy of the body, by the generation protocol: the writer makes the
        generation odd, writes, then makes it even; a copy counts only if the same even
        generation is read before and after it. While a write is in progress the previous
        copy is returned (it still holds: the bound only widens with time); the first call
        waits for the write, at most ``_STABLE_WAIT_S``."""
        gen = self._gen[0]
        snap = self._snap
        if snap is not None and (gen == self._snap_gen or gen & 1):
            return snap
        if gen == 0:  # created but never written: nothing to trust yet
            return _UNWRITTEN
        deadline = time.monotonic() + _STABLE_WAIT_S
        view, unpack = self._view, BODY.unpack_from
        while True:
            if gen & 1 == 0:
                fields = unpack(view, HEADER.size)
                again = self._gen[0]
                if again == gen:
                    version = HEADER.unpack_from(view, 0)[3]
                    if version != VERSION:
                        raise SegmentError(f"{self.path}: segment version is now {version}")
                    snap = _body(gen, fields)
                    self._snap, self._snap_gen = snap, gen
                    return snap
            if time.monotonic() > deadline:
                raise SegmentError(f"{self.path}: segment never stable (generation {gen})")
            time.sleep(0.0005)
            gen = self._gen[0]

    def now(self) -> Now:
        """Earliest and latest possible true time now (Unix ns), and the status."""
        real = self._realtime_ns()
        mono = _monotonic_ns()
        if mono < self._until:
            bound = self._bound
            return _new_tuple(Now, (real - bound, real + bound, self._status))
        return _new_tuple(Now, self._slow_now(real, mono))

    def now_ns(self) -> tuple[int, int, ClockStatus]:
        """:meth:`now` as a plain ``(earliest_ns, latest_ns, status)`` tuple, for hot paths
        (building the named tuple costs about half of the rest of the call).

        Cost: the segment is looked at (generation, then a copy if it changed) at most once
        per ``_BUCKET_NS`` (1 ms) of ``CLOCK_MONOTONIC``; in between, the bound widened to the
        end of that millisecond is reused (at most max drift x 1 ms wider: nanoseconds). So a
        new snapshot is seen up to 1 ms after it is written, well within the writer's own
        publication delay; the previous one still holds meanwhile (bounds only widen).
        Elapsed time since as-of is read on ``CLOCK_MONOTONIC``, the time base of the
        segment's ``CLOCK_MONOTONIC_COARSE`` and never behind it: it can only widen more."""
        real = self._realtime_ns()
        mono = _monotonic_ns()
        if mono < self._until:
            bound = self._bound
            return real - bound, real + bound, self._status
        return self._slow_now(real, mono)

    def _slow_now(self, real: int, mono: int) -> tuple[int, int, ClockStatus]:
        """A new segment generation, the end of a bucket, void-after or a causality breach."""
        snap = self.snapshot()
        bound, status = widen(snap, mono)
        self._until = 0  # no reuse while not in the plain case
        if self._gen[0] == snap.generation and snap.as_of_ns <= mono < snap.void_after_ns:
            until = min(mono + _BUCKET_NS, snap.void_after_ns)
            bound = widen(snap, until)[0]
            self._bound, self._status, self._until = bound, status, until
        return real - bound, real + bound, status

    def check_window(self, not_before: float | None, not_after: float | None,
                     **options: float | bool) -> WindowCheck:
        """:func:`check_window` against :meth:`now` (``options`` as there)."""
        return check_window(self.now(), not_before, not_after, **options)  # type: ignore[arg-type]

    def wait_until_synchronised(self, timeout_s: float, poll_s: float = 0.05) -> Now:
        """Block until the clock is SYNCHRONIZED; ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            t = self.now()
            if t.status is ClockStatus.SYNCHRONIZED:
                return t
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.path}: clock not synchronised after {timeout_s} s "
                                   f"(status {t.status.name})")
            time.sleep(min(poll_s, left))
