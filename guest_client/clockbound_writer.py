"""Publish the guest's error bound as a ClockBound shared-memory segment (protocol version 2).

Layout and reader semantics are in :mod:`timesyncd.clockbound` and ``docs/CLOCKBOUND.md``.
The writer follows the generation protocol: make the generation odd, write the body, make it
even (wrapping to 2, never 0). Readers take a copy only when they read the same even value
before and after it.

Ordering (why readers never see a torn body): on x86-64 (TSO) stores become visible in
program order and loads are not reordered with other loads, so the three stores, each a
separate C call on the mapping, need no fence. On aarch64 neither holds, and Python has no
fence instruction. We use ``membarrier(MEMBARRIER_CMD_GLOBAL)`` (Linux >= 4.3) after the odd
store and before the even store: the man page guarantees that when it returns, every thread
of every process has passed a point where its memory accesses match program order, the
caller included. It is the documented heavy side of an asymmetric fence, so it orders our
stores for every reader and also orders a reader's loads without any fence on its side (our
Python reader has none; ClockBound's readers use acquire loads anyway). It takes a few ms
(an RCU grace period), so writes run on a thread of their own, never on the event loop. With
no membarrier, x86-64 carries on (TSO suffices) and other architectures refuse to publish.

The generation is stored through a ``ctypes.c_uint16``: one 16-bit store. The body is one
slice assignment (a memcpy); it may be stored in any order, which is what the odd
generation covers.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from guest_client.shm_file import describe, mapped_writable_by, open_segment_file
from timesyncd.clockbound import (
    BODY,
    CLOCK_MONOTONIC_COARSE,
    GENERATION_OFFSET,
    HEADER,
    MAGIC,
    SEGMENT_SIZE,
    VERSION,
    ClockStatus,
)

log = logging.getLogger(__name__)

_NS = 1_000_000_000
MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
_TSO = {"x86_64", "amd64", "i686", "i386"}
#: Bound published with status UNKNOWN (the kernel's maxerror ceiling), so that a client that
#: ignores the status still gets a wide interval rather than a zero one.
UNKNOWN_BOUND_NS = 16 * _NS


@dataclass(frozen=True, slots=True)
class PublishedBound:
    """What the segment says: ``|clock - true time| <= bound_ns`` at ``as_of_monotonic_ns``
    (``CLOCK_MONOTONIC_COARSE``), widening by ``max_drift_ppb`` afterwards."""

    as_of_monotonic_ns: int
    bound_ns: int
    max_drift_ppb: int
    status: ClockStatus
    #: VMClock's marker, copied so readers see a disruption at once (support on with VMClock)
    disruption_marker: int = 0
    disruption_support: bool = False


class Fence:
    """A full memory barrier for the writer's stores, as the module doc explains."""

    def __init__(self, machine: str | None = None, *, membarrier: bool = True) -> None:
        """``membarrier=False`` (tests, benchmarks) is only accepted on a TSO machine."""
        machine = machine or platform.machine()
        self.kind = "none"
        self._syscall = None
        nr = _SYS_MEMBARRIER.get(machine)
        if nr is not None and membarrier:
            libc = ctypes.CDLL(None, use_errno=True)
            supported = libc.syscall(nr, MEMBARRIER_CMD_QUERY, 0, 0)
            if supported > 0 and supported & MEMBARRIER_CMD_GLOBAL:
                self._syscall, self._nr, self.kind = libc.syscall, nr, "membarrier"
        if self.kind == "none":
            if machine not in _TSO:
                raise OSError(errno.ENOSYS, f"clockbound_shm: no membarrier(2) on {machine}: "
                              "cannot order the segment's writes for readers on other CPUs")
            self.kind = "tso"

    def __call__(self) -> None:
        if self._syscall is not None and self._syscall(self._nr, MEMBARRIER_CMD_GLOBAL, 0, 0):
            raise OSError(ctypes.get_errno(), "membarrier failed")


class ClockBoundWriter:
    """The segment at ``path``: opened safely (:mod:`guest_client.shm_file`), status UNKNOWN
    until the first :meth:`write`, UNKNOWN again on :meth:`close`. Not thread-safe: one
    thread writes (:class:`SegmentPublisher`)."""

    def __init__(self, path: str, void_after_s: float, fence: Fence | None = None) -> None:
        self.path = path
        self.void_after_ns = round(void_after_s * _NS)
        self.counters: Counter[str] = Counter()
        self._fence = fence or Fence()
        self.fence_kind = self._fence.kind
        self._fd = open_segment_file(path, SEGMENT_SIZE)
        try:
            self._map = mmap.mmap(self._fd, SEGMENT_SIZE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._gen = ctypes.c_uint16.from_buffer(self._map, GENERATION_OFFSET)
        self._last_gen = self._init_header()
        self.write(self._unknown())

    def _init_header(self) -> int:
        """Keep a valid segment's generation (readers caching a copy see a change); an
        invalid one is rewritten with version 0 (readers wait) until the first body is in."""
        m0, m1, size, version, gen = HEADER.unpack_from(self._map, 0)
        if (m0, m1, size, version) == (*MAGIC, SEGMENT_SIZE, VERSION):
            return int(gen) & ~1
        self._map[:HEADER.size] = HEADER.pack(*MAGIC, SEGMENT_SIZE, 0, 0)
        return 0

    @staticmethod
    def _unknown() -> PublishedBound:
        as_of = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        return PublishedBound(as_of, UNKNOWN_BOUND_NS, 0, ClockStatus.UNKNOWN)

    def write(self, b: PublishedBound) -> None:
        """Publish ``b`` by the generation protocol (see the module doc for the ordering)."""
        if os.fstat(self._fd).st_size < SEGMENT_SIZE:  # truncated under us: writing = SIGBUS
            self.counters["file_truncated"] += 1
            raise OSError(errno.EIO, f"clockbound_shm: {self.path} was truncated by another "
                          "process; not writing")
        gen = self._gen.value
        if gen != self._last_gen:
            self.counters["foreign_writer"] += 1
            st = os.fstat(self._fd)
            log.error("clockbound_shm: %s changed under us (generation %d, we wrote %d): "
                      "another writer: %s", self.path, gen, self._last_gen,
                      describe(mapped_writable_by(st)))
        odd = (gen | 1) & 0xFFFF
        body = BODY.pack(
            *divmod(b.as_of_monotonic_ns, _NS),
            *divmod(b.as_of_monotonic_ns + self.void_after_ns, _NS),
            min(max(b.bound_ns, 0), 2**63 - 1), b.disruption_marker & (2**64 - 1),
            min(max(b.max_drift_ppb, 0), 999_999_999), int(b.status), int(b.disruption_support))
        self._gen.value = odd
        self._fence()
        self._map[HEADER.size:SEGMENT_SIZE] = body
        self._fence()
        even = (odd + 1) & 0xFFFF or 2
        self._gen.value = even
        self._last_gen = even
        if struct.unpack_from("@H", self._map, 12)[0] != VERSION:  # first write: readable now
            struct.pack_into("@H", self._map, 12, VERSION)
        self.counters["writes"] += 1

    def close(self) -> None:
        """Say UNKNOWN (nobody keeps the bound true any more), unmap, unlock. The file stays:
        readers keep their mapping and see the status."""
        if self._fd < 0:
            return
        try:
            self.write(self._unknown())
        except OSError as exc:
            log.error("clockbound_shm: could not write UNKNOWN on stop: %s", exc)
        del self._gen
        self._map.close()
        os.close(self._fd)
        self._fd = -1


class SegmentPublisher:
    """Writes on a thread of its own (a write blocks for two membarrier calls): ``submit``
    never blocks; the latest bound wins; ``close`` writes UNKNOWN and joins."""

    def __init__(self, writer: ClockBoundWriter) -> None:
        self.writer = writer
        self.errors = 0
        self._cond = threading.Condition()
        self._pending: PublishedBound | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="clockbound-writer", daemon=True)
        self._thread.start()

    def submit(self, bound: PublishedBound) -> None:
        with self._cond:
            self._pending = bound
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                bound, self._pending = self._pending, None
            assert bound is not None
            try:
                self.writer.write(bound)
            except OSError as exc:
                self.errors += 1
                log.error("clockbound_shm: write failed: %s", exc)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # a write stuck in the kernel: do not race it
            log.error("clockbound_shm: writer thread did not stop; segment left as is")
            return
        self.writer.close()
