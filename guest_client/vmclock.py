"""The VMClock device reader: a read-only mmap of the hypervisor's clock page. Sans policy.

Linux 6.13+ exposes the VMClock page (``/dev/vmclock0``, ``include/uapi/linux/vmclock-abi.h``)
that the hypervisor writes: a seqcount, a disruption marker that changes when the counter is
disrupted (live migration, snapshot restore), a clock status, a leap indicator and, with
``VM_GEN_COUNTER_PRESENT``, a VM generation counter that changes on every load from a saved
state (restore and clone). The guest only *watches* the marker and the generation; using the
page's own time as a source is out of scope (docs/DEPLOYMENT.md).

Reads follow the seqcount protocol: an odd count is an update in progress, and a snapshot is
kept only if the count is even and unchanged across the copy; a torn read is retried, a
hypervisor that never finishes is an error after ``MAX_RETRIES``. The page is mapped
read-only (``PROT_READ``): nothing here can write it.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = 0x4B4C4356  # "VCLK", little-endian u32 at offset 0
#: The ABI struct up to ``time_maxerror_nanosec`` (version 1 as first published)...
BASE_SIZE = 104
#: ... and with ``vm_generation_counter`` (valid only with FLAG_VM_GEN_COUNTER_PRESENT).
GEN_SIZE = 112
SUPPORTED_VERSION = 1
MAX_RETRIES = 1000
_SEQ_OFFSET = 12
_HEAD = struct.Struct("<IIHBB")  # magic, size, version, counter_id, time_type
#: seq_count, disruption_marker, flags, pad[2], clock_status, smearing hint, tai_offset_sec,
#: leap_indicator, counter_period_shift, counter_value, period, esterror rate, maxerror rate,
#: time_sec, time_frac_sec, time_esterror_nanosec, time_maxerror_nanosec
_BODY = struct.Struct("<IQQ2xBBhBBQQQQQQQQ")
_GEN = struct.Struct("<Q")

FLAG_TAI_OFFSET_VALID = 1 << 0
FLAG_DISRUPTION_SOON = 1 << 1
FLAG_DISRUPTION_IMMINENT = 1 << 2
FLAG_VM_GEN_COUNTER_PRESENT = 1 << 8
FLAG_NOTIFICATION_PRESENT = 1 << 9  # poll() on the device wakes on each update


class ClockStatus(IntEnum):
    UNKNOWN = 0
    INITIALIZING = 1
    SYNCHRONIZED = 2
    FREERUNNING = 3
    UNRELIABLE = 4


class Leap(IntEnum):
    NONE = 0
    PRE_POS = 1
    PRE_NEG = 2
    POS = 3
    POST_POS = 4
    POST_NEG = 5


class VmClockError(OSError):
    """The device is missing, not a VMClock page, of an unknown version, or never settles."""


@dataclass(frozen=True, slots=True)
class VmClockSnapshot:
    """One consistent read of the page's watched fields."""

    seq: int
    disruption_marker: int
    flags: int
    clock_status: int
    leap_indicator: int
    vm_generation: int | None  # None: the device does not provide the counter

    @property
    def status_name(self) -> str:
        try:
            return ClockStatus(self.clock_status).name.lower()
        except ValueError:
            return f"invalid({self.clock_status})"

    @property
    def leap_name(self) -> str:
        try:
            return Leap(self.leap_indicator).name.lower()
        except ValueError:
            return f"invalid({self.leap_indicator})"

    @property
    def notifies(self) -> bool:
        return bool(self.flags & FLAG_NOTIFICATION_PRESENT)


def check_path(path: str, allow_regular_file: bool = False) -> None:
    """A VMClock path must be a character device; a regular file only for tests
    (``vmclock_testing_file``). Raises :class:`VmClockError` naming the option."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise VmClockError(f"vmclock: cannot open {path}: {exc.strerror}") from exc
    if stat.S_ISCHR(st.st_mode):
        return
    if stat.S_ISREG(st.st_mode) and allow_regular_file:
        return
    raise VmClockError(
        f"vmclock: {path} is not a character device (a regular file is accepted only with "
        "vmclock_testing_file, for tests)")


class VmClockReader:
    """A read-only mapping of the VMClock page; :meth:`read` returns a consistent snapshot."""

    def __init__(self, path: str, *, allow_regular_file: bool = False) -> None:
        check_path(path, allow_regular_file)
        self.path = path
        self.torn_reads = 0  # reads retried because the hypervisor was mid-update
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length = min(os.fstat(fd).st_size or mmap.PAGESIZE, mmap.PAGESIZE)
            if length < BASE_SIZE:
                raise VmClockError(f"vmclock: {path} is {length} bytes, shorter than the ABI")
            self._map = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise VmClockError(f"vmclock: cannot map {path}: {exc}") from exc
        finally:
            os.close(fd)  # the mapping keeps the page; no descriptor is held
        try:
            self._check_header()
        except VmClockError:
            self._map.close()
            raise

    def _check_header(self) -> None:
        magic, size, version, _counter, _ttype = _HEAD.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise VmClockError(f"vmclock: {self.path}: bad magic {magic:#010x}")
        if version != SUPPORTED_VERSION:
            raise VmClockError(f"vmclock: {self.path}: unsupported ABI version {version}")
        if size < BASE_SIZE:
            raise VmClockError(f"vmclock: {self.path}: region size {size} too small")
        self.size = min(size, len(self._map))

    def read(self) -> VmClockSnapshot:
        """A consistent snapshot (seqcount protocol; torn reads retried and counted)."""
        m = self._map
        for _ in range(MAX_RETRIES):
            (seq,) = struct.unpack_from("<I", m, _SEQ_OFFSET)
            if seq & 1:
                self.torn_reads += 1
                continue
            body = _BODY.unpack_from(m, _SEQ_OFFSET)
            gen = _GEN.unpack_from(m, BASE_SIZE)[0] if self.size >= GEN_SIZE else None
            (after,) = struct.unpack_from("<I", m, _SEQ_OFFSET)
            if after != seq or body[0] != seq:
                self.torn_reads += 1
                continue
            flags = body[2]
            if not flags & FLAG_VM_GEN_COUNTER_PRESENT:
                gen = None
            return VmClockSnapshot(seq, body[1], flags, body[3], body[6], gen)
        raise VmClockError(f"vmclock: {self.path}: seqcount never settled "
                           f"({MAX_RETRIES} tries)")

    def close(self) -> None:
        self._map.close()


def encode_page(*, seq: int = 0, marker: int = 0, flags: int = FLAG_VM_GEN_COUNTER_PRESENT,
                clock_status: int = ClockStatus.SYNCHRONIZED, leap: int = 0,
                generation: int = 0, size: int = 4096, version: int = SUPPORTED_VERSION,
                magic: int = MAGIC) -> bytes:
    """A page with the kernel's layout (for fake devices in tests and the simulator)."""
    head = _HEAD.pack(magic, size, version, 1, 0)
    body = _BODY.pack(seq, marker, flags, clock_status, 0, 0, leap, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    page = head + body + _GEN.pack(generation)
    return page.ljust(size, b"\0")
