"""Clock drivers: the real system clock (Linux ``clock_adjtime``) and a user-space clock.

``SystemClock`` only ever *slews* through the kernel frequency (``ADJ_TICK`` + ``ADJ_FREQUENCY``)
and steps with ``ADJ_SETOFFSET``, like chrony; the kernel PLL is left off. The ``clock_adjtime``
function is injectable so tests check the exact ``struct timex`` written without touching the
machine's clock. ``SoftwareClock`` runs over ``CLOCK_MONOTONIC`` with a chosen rate error and
offset, so demos and end-to-end tests discipline a clock whose true error they know.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from timesyncd.clock import Clock, ClockFrequency, KernelStatus
from timesyncd.clock_pair import read_pair
from timesyncd.packet import Leap

log = logging.getLogger(__name__)

CLOCK_REALTIME = 0

# struct timex modes (linux/timex.h)
ADJ_OFFSET = 0x0001
ADJ_FREQUENCY = 0x0002
ADJ_MAXERROR = 0x0004
ADJ_ESTERROR = 0x0008
ADJ_STATUS = 0x0010
ADJ_SETOFFSET = 0x0100
ADJ_NANO = 0x2000
ADJ_TICK = 0x4000

# status bits
STA_PLL = 0x0001
STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040
STA_NANO = 0x2000

#: Kernel limit on ``timex.freq`` (ppm); the rest of a correction goes into the tick length.
MAX_FREQ_PPM = 500.0
_FREQ_SCALE = 1 << 16  # timex.freq is ppm in 16.16 fixed point
_NS = 1_000_000_000


class Timex(ctypes.Structure):
    """``struct timex`` as the Linux UAPI defines it (long-sized fields, 11 padding ints)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),  # struct timeval time
        ("time_usec", ctypes.c_long),  # nanoseconds with ADJ_NANO
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


#: ``fn(clock_id, pointer(Timex)) -> int`` with libc semantics: -1 and ``ctypes`` errno on error.
TimexFn = Callable[[int, Any], int]


def libc_clock_adjtime() -> TimexFn:
    """Resolve ``clock_adjtime`` in the process namespace, so LD_PRELOAD interposers apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.clock_adjtime
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(Timex)]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class KernelClockState:
    """A read-only snapshot of the kernel clock (``clock_adjtime`` with ``modes = 0``)."""

    state: int  # TIME_OK, TIME_INS, ... TIME_ERROR (5)
    frequency_ppm: float  # total correction: tick and freq combined, positive runs faster
    tick_us: int
    freq_ppm: float
    status: int
    maxerror_us: int
    esterror_us: int

    @property
    def synchronised(self) -> bool:
        return not self.status & STA_UNSYNC


def split_frequency(ppm: float, nominal_tick_us: int) -> tuple[int, int]:
    """Split a total correction into ``(tick_us, scaled freq)``.

    One tick unit (1 us per tick) is ``1e6 / nominal_tick_us`` ppm (100 ppm at USER_HZ=100).
    Up to the kernel's 500 ppm the whole correction goes in ``freq`` with a nominal tick: that
    is what a clean stop leaves (a base frequency), and the next start keeps only a nominal
    tick (a moved tick means a slew left behind). Beyond, rounding to the nearest tick keeps
    ``|freq|`` at half a unit.
    """
    if abs(ppm) <= MAX_FREQ_PPM:
        return nominal_tick_us, round(ppm * _FREQ_SCALE)
    unit_ppm = 1e6 / nominal_tick_us
    ticks = round(ppm / unit_ppm)
    freq_ppm = ppm - ticks * unit_ppm
    return nominal_tick_us + ticks, round(freq_ppm * _FREQ_SCALE)


class SystemClock(Clock):
    """The machine's ``CLOCK_REALTIME``, adjusted through ``clock_adjtime`` (needs CAP_SYS_TIME)."""

    def __init__(
        self, timex_fn: TimexFn | None = None, *, clock_id: int = CLOCK_REALTIME,
        user_hz: int | None = None,
    ) -> None:
        self._fn = timex_fn if timex_fn is not None else libc_clock_adjtime()
        self._clock_id = clock_id
        hz = user_hz if user_hz is not None else os.sysconf("SC_CLK_TCK")
        self.nominal_tick_us = 1_000_000 // hz
        unit = 1e6 / self.nominal_tick_us
        # the kernel accepts tick within +-10% of nominal
        self.max_frequency_ppm = min(100_000.0, self.nominal_tick_us // 10 * unit)
        self.frequency_ppm = 0.0

    def _call(self, tx: Timex, what: str) -> int:
        ctypes.set_errno(0)
        rc = self._fn(self._clock_id, ctypes.pointer(tx))
        if rc < 0:
            err = ctypes.get_errno()
            if err == errno.EPERM:
                raise PermissionError(
                    errno.EPERM,
                    f"clock_adjtime ({what}) not permitted: adjusting the system clock needs "
                    "CAP_SYS_TIME (run as root or grant the capability), or use --clock software",
                )
            raise OSError(err, f"clock_adjtime ({what}) failed: {os.strerror(err)}")
        return rc

    def read(self) -> KernelClockState:
        """Query the kernel clock without changing anything (``modes = 0``)."""
        tx = Timex()
        tx.modes = 0
        rc = self._call(tx, "read")
        unit = 1e6 / self.nominal_tick_us
        freq = tx.freq / _FREQ_SCALE
        return KernelClockState(
            state=rc, frequency_ppm=(tx.tick - self.nominal_tick_us) * unit + freq,
            tick_us=tx.tick, freq_ppm=freq, status=tx.status,
            maxerror_us=tx.maxerror, esterror_us=tx.esterror,
        )

    def now_ns(self) -> int:
        return time.time_ns()

    def read_frequency(self) -> ClockFrequency:
        state = self.read()
        return ClockFrequency(state.frequency_ppm, state.tick_us == self.nominal_tick_us)

    def set_frequency(self, ppm: float) -> None:
        limit = self.max_frequency_ppm
        ppm = min(max(ppm, -limit), limit)
        tx = Timex()
        tx.modes = ADJ_FREQUENCY | ADJ_TICK
        tx.tick, tx.freq = split_frequency(ppm, self.nominal_tick_us)
        self._call(tx, "set frequency")
        self.last_change_ns = self.now_ns()  # right after the call: the closest we can tell
        self.frequency_ppm = ppm

    def step(self, offset_ns: int) -> None:
        tx = Timex()
        tx.modes = ADJ_SETOFFSET | ADJ_NANO
        # the kernel wants a normalised timeval: 0 <= nanoseconds < 1e9, sign in the seconds
        tx.time_sec, tx.time_usec = divmod(offset_ns, _NS)
        self._call(tx, "step")
        log.info("stepped system clock by %+.9f s", offset_ns / _NS)

    def set_kernel_status(self, status: KernelStatus) -> None:
        tx = Timex()
        tx.modes = ADJ_MAXERROR | ADJ_ESTERROR | ADJ_STATUS
        tx.maxerror = _us(status.maxerror_s)
        tx.esterror = _us(status.esterror_s)
        bits = 0
        if not status.synchronised or status.leap == Leap.UNSYNCHRONISED:
            bits |= STA_UNSYNC
        if status.leap == Leap.INSERT:
            bits |= STA_INS
        elif status.leap == Leap.DELETE:
            bits |= STA_DEL
        tx.status = bits
        self._call(tx, "set status")


def _us(seconds: float) -> int:
    """Error bound in microseconds, clamped to what the kernel keeps (it caps at 16 s)."""
    return min(max(int(seconds * 1e6), 0), 16_000_000)


class SoftwareClock(Clock):
    """A user-space clock over ``CLOCK_MONOTONIC``: reading = start + elapsed * rate + steps.

    ``freq_ppm`` is its native rate error (positive runs fast) and ``offset_s`` its error at
    creation, both relative to the machine's ``CLOCK_REALTIME`` (the ground truth; both kernel
    clocks share the same rate, so realtime minus monotonic only moves when realtime steps).
    """

    def __init__(
        self, freq_ppm: float = 0.0, offset_s: float = 0.0, *,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        real_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.native_ppm = freq_ppm
        self.correction_ppm = 0.0
        self.kernel_status: KernelStatus | None = None
        self.steps: list[int] = []
        self._mono = mono_ns
        self._real = real_ns
        self._anchor_mono = mono_ns()
        self._anchor_reading = real_ns() + round(offset_s * _NS)
        #: Like a kernel at USER_HZ=100: corrections beyond 500 ppm move the tick.
        self.nominal_tick_us = 10_000

    @property
    def rate(self) -> float:
        """Seconds this clock advances per true second."""
        return (1.0 + self.native_ppm * 1e-6) * (1.0 + self.correction_ppm * 1e-6)

    def _reading(self, mono: int) -> int:
        return self._anchor_reading + round((mono - self._anchor_mono) * self.rate)

    def _rebase(self) -> None:
        mono = self._mono()
        self._anchor_reading = self._reading(mono)
        self._anchor_mono = mono

    def now_ns(self) -> int:
        return self._reading(self._mono())

    def set_frequency(self, ppm: float) -> None:
        self._rebase()
        self.last_change_ns = self._anchor_reading  # exactly where the new rate starts
        limit = self.max_frequency_ppm
        self.correction_ppm = min(max(ppm, -limit), limit)

    def step(self, offset_ns: int) -> None:
        self._rebase()
        self._anchor_reading += offset_ns
        self.steps.append(offset_ns)

    def set_kernel_status(self, status: KernelStatus) -> None:
        self.kernel_status = status

    def read_frequency(self) -> ClockFrequency:
        tick, _ = split_frequency(self.correction_ppm, self.nominal_tick_us)
        return ClockFrequency(self.correction_ppm, tick == self.nominal_tick_us)

    def true_offset_ns(self) -> int:
        """This clock minus ``CLOCK_REALTIME`` (:func:`timesyncd.clock_pair.read_pair`: read
        back to back, a preemption between the reads came out as that much negative offset,
        and the truth the bounds are tested against must not be the noisy part)."""
        pair = read_pair(self._mono, self._real)
        return self._reading(pair.first_ns) - pair.second_ns
