"""The frequency file (chrony's driftfile): the learned frequency kept across restarts.

A guest with persistent storage (a Firecracker microVM's root disk; not a Nitro enclave, whose
file system dies with it) writes its base frequency correction and that estimate's uncertainty
here, atomically, every ``freq_file_interval_s`` and when it stops. At start,
:func:`start_frequency` decides what the clock's frequency is before the first sample: a fresh
file's value, else the kernel's current correction when it looks like a plain base frequency
(tick nominal, at most 500 ppm), else zero. A missing, corrupt or stale file is logged and
ignored: it only ever saves the time it takes to learn the frequency again.

Format, one line: ``timesync-freq 1 <frequency ppm> <uncertainty ppm> <written, Unix s>``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from timesyncd.clock import ClockFrequency

log = logging.getLogger(__name__)

MAGIC = "timesync-freq"
VERSION = 1
#: A file or kernel correction beyond this is not a plausible base frequency (ppm).
MAX_BASE_PPM = 500.0
#: A file dated this far in the future (seconds) says the clock or the file is wrong.
FUTURE_SLACK_S = 60.0
_MAX_BYTES = 4096


@dataclass(frozen=True, slots=True)
class FreqRecord:
    """One frequency file's content."""

    frequency_ppm: float  # base correction applied to the clock, positive runs faster
    sd_ppm: float  # the estimate's standard uncertainty
    written_s: float  # the disciplined clock's reading when written, Unix seconds

    def encode(self) -> bytes:
        return (f"{MAGIC} {VERSION} {self.frequency_ppm:.6f} {self.sd_ppm:.6f} "
                f"{self.written_s:.3f}\n").encode()


@dataclass(frozen=True, slots=True)
class StartFrequency:
    """The frequency correction to start from, and why."""

    ppm: float
    sd_ppm: float | None  # None: unknown
    set_kernel: bool  # write ``ppm`` to the clock at start (else it already holds it)
    reason: str


class FreqFileError(ValueError):
    """The file exists but cannot be used; the message says why."""


def parse(text: str) -> FreqRecord:
    """Decode one file; :class:`FreqFileError` naming what is wrong."""
    parts = text.split()
    if len(parts) != 5 or parts[0] != MAGIC:
        raise FreqFileError(f"not a frequency file (expected '{MAGIC} {VERSION} FREQ SD TIME')")
    if parts[1] != str(VERSION):
        raise FreqFileError(f"format version {parts[1]!r}, expected {VERSION}")
    try:
        freq, sd, written = (float(p) for p in parts[2:])
    except ValueError:
        raise FreqFileError("frequency, uncertainty or time is not a number") from None
    return check(FreqRecord(freq, sd, written))


def check(record: FreqRecord) -> FreqRecord:
    """``record`` if a file may hold it, else :class:`FreqFileError` naming why: the one
    rule for what is read back and what is written (a record the next start would refuse
    is not written)."""
    freq = record.frequency_ppm
    if not all(math.isfinite(v) for v in (freq, record.sd_ppm, record.written_s)) \
            or record.sd_ppm < 0:
        raise FreqFileError("frequency, uncertainty or time is not finite (or sd < 0)")
    if abs(freq) > MAX_BASE_PPM:
        raise FreqFileError(f"frequency {freq:+.3f} ppm is beyond +-{MAX_BASE_PPM:.0f} ppm")
    return record


def load(path: str, now_s: float, max_age_s: float) -> FreqRecord | None:
    """The file's record if it is there, well formed and fresh; otherwise None, logged."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        log.info("frequency file %s: not there yet; learning the frequency from scratch", path)
        return None
    except OSError as exc:
        log.warning("frequency file %s: cannot read (%s); ignored", path, exc)
        return None
    try:
        if len(raw) > _MAX_BYTES:
            raise FreqFileError(f"longer than {_MAX_BYTES} bytes")
        record = parse(raw.decode("ascii"))
    except (FreqFileError, UnicodeDecodeError) as exc:
        log.warning("frequency file %s: corrupt (%s); ignored", path, exc)
        return None
    age = now_s - record.written_s
    if age < -FUTURE_SLACK_S:
        log.warning("frequency file %s: written %.0f s in the future (clock or file wrong); "
                    "ignored", path, -age)
        return None
    if age > max_age_s:
        log.warning("frequency file %s: stale (%.0f s old, limit freq_file_max_age_s %.0f s); "
                    "ignored", path, age, max_age_s)
        return None
    return record


def save(path: str, record: FreqRecord) -> None:
    """Replace the file atomically: write a temporary file beside it, fsync, rename, fsync
    the directory (a crash leaves the old file or the new one, never a torn one).
    Raises OSError; the caller logs it (a failed write is never fatal)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, record.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def start_frequency(record: FreqRecord | None, kernel: ClockFrequency | None) -> StartFrequency:
    """What the clock's frequency correction is at start (the issue-9 rule, like chrony's)."""
    if record is not None:
        return StartFrequency(record.frequency_ppm, record.sd_ppm, True, "frequency file")
    if kernel is None:
        return StartFrequency(0.0, None, True, "clock cannot be read: reset to 0")
    if kernel.tick_nominal and abs(kernel.ppm) <= MAX_BASE_PPM:
        return StartFrequency(kernel.ppm, None, False, "kept the clock's current correction")
    why = "tick off nominal" if not kernel.tick_nominal else f"beyond {MAX_BASE_PPM:.0f} ppm"
    return StartFrequency(0.0, None, True,
                          f"clock held {kernel.ppm:+.3f} ppm ({why}, a slew left behind?): "
                          "reset to 0")
