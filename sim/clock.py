"""``SimClock``: a ``timesyncd.clock.Clock`` in true virtual time, integrated exactly.

Corrections *multiply* the oscillator's rate, as Linux applies ``adjtimex`` frequency and tick
(no tick granularity is modelled): since the last frequency change or step (an *anchor* at true
``a``) the reading is ``reading(a) + (1 + c) * ((t - a) + P(t) - P(a))`` where ``P`` is the
oscillator's exact phase from 0 and ``c`` the applied correction. The reading is therefore a
function of the anchors only, not of the instants at which the engine happened to advance the
clock: :meth:`SimClock.offsets_at` evaluates any number of past instants at once, bit for bit
what :meth:`offset_s` would have said there. Read noise (Gaussian) only affects what ``now_ns``
returns, never the clock itself.
"""

from __future__ import annotations

import random
from array import array

import numpy as np
import numpy.typing as npt

from sim.oscillator import Oscillator
from timesyncd.clock import Clock, KernelStatus

_NS = 1_000_000_000
_CHUNK = 1 << 16
FloatArray = npt.NDArray[np.float64]


class SimClock(Clock):
    """Virtual-time clock driven by an :class:`Oscillator`; the engine moves ``true_s``."""

    def __init__(self, oscillator: Oscillator, *, start_unix_ns: int,
                 initial_offset_s: float = 0.0, read_noise_s: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.oscillator = oscillator
        self.start_unix_ns = start_unix_ns
        self.read_noise_s = read_noise_s
        self._rng = rng or random.Random(0)
        self._t = 0.0  # true seconds since start
        self._p = 0.0  # oscillator phase from 0 to _t
        self._reading_s = initial_offset_s  # reading minus start_unix, seconds
        self._rate = 1.0  # 1 + correction
        self.frequency_ppm = 0.0
        self.kernel_status = KernelStatus(synchronised=False)
        self.steps: list[tuple[float, int]] = []  # (true_s, offset_ns)
        self.offsets_before_steps_s: list[float] = []
        # anchors (true_s, reading_s, phase, 1 + correction), in order, as packed doubles
        # (a year of discipline makes millions); the last one, current, also as a tuple
        self._anchors = tuple(array("d") for _ in range(4))
        self._current = (0.0, 0.0, 0.0, 1.0)
        self._anchor()

    def _anchor(self) -> None:
        self._current = (self._t, self._reading_s, self._p, self._rate)
        for column, value in zip(self._anchors, self._current, strict=True):
            column.append(value)

    def anchors(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Copies of the anchor columns: true_s, reading_s, phase, 1 + correction."""
        return tuple(np.array(c, dtype=np.float64) for c in self._anchors)  # type: ignore

    @property
    def true_s(self) -> float:
        return self._t

    def advance_to(self, true_s: float) -> None:
        """Move true time forward (never back) to ``true_s``."""
        if true_s <= self._t:
            return
        a_t, a_reading, a_p, rate = self._current
        p = self.oscillator.phase_to(true_s)
        self._reading_s = a_reading + rate * ((true_s - a_t) + (p - a_p))
        self._t = true_s
        self._p = p

    def offset_s(self) -> float:
        """Exact clock minus true time, seconds (no read noise)."""
        return self._reading_s - self._t

    def offsets_at(self, times_s: FloatArray) -> FloatArray:
        """:meth:`offset_s` at each of ``times_s`` (true seconds, 0 <= t <= :attr:`true_s`),
        as it was or would have been after every change made at or before that instant."""
        t = np.asarray(times_s, dtype=np.float64)
        if len(t) and (t.min() < 0.0 or t.max() > self._t):
            raise ValueError("offsets_at: instants must lie in [0, true_s]")
        out = np.empty(len(t))
        views = self._views()
        for i in range(0, len(t), _CHUNK):  # elementwise: chunks bound the temporaries
            out[i:i + _CHUNK] = offsets_from_anchors(*views, self.oscillator, t[i:i + _CHUNK])
        return out

    def breakpoints(self) -> tuple[FloatArray, FloatArray]:
        """(true_s, offset_s) after every frequency change and step. Between them the offset's
        slope only follows the oscillator's slow wander and load, so its extremes are here (and,
        for steps, at :attr:`offsets_before_steps_s`)."""
        a_t, a_reading, _, _ = self._views()
        return a_t.copy(), a_reading - a_t

    def max_abs_breakpoint_offset_s(self, chunk: int = 1 << 16) -> float:
        """max |offset| over :meth:`breakpoints`, in chunks (a year has millions of them)."""
        a_t, a_reading, _, _ = self._views()
        best = 0.0
        for i in range(0, len(a_t), chunk):
            best = max(best, float(np.max(np.abs(a_reading[i:i + chunk] - a_t[i:i + chunk]))))
        return best

    def _views(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """The anchor columns without copying (only for use before the next anchor)."""
        return tuple(np.frombuffer(c, dtype=np.float64) for c in self._anchors)  # type: ignore

    def rate_error_ppm(self) -> float:
        """Current rate of the corrected clock relative to true time, minus one, ppm."""
        e = self.oscillator.ppm_at(self._t) * 1e-6
        return ((1.0 + e) * self._rate - 1.0) * 1e6

    def true_time_at(self, reading_ns: int) -> float:
        """Approximate true time at which the clock will read ``reading_ns`` (rate held)."""
        e = self.oscillator.ppm_at(self._t) * 1e-6  # rate_error_ppm(), inlined: hot path
        rate = 1.0 + ((1.0 + e) * self._rate - 1.0) * 1e6 * 1e-6
        target = (reading_ns - self.start_unix_ns) / _NS
        return self._t + max(target - self._reading_s, 0.0) / rate

    # --- Clock interface ---------------------------------------------------------------------
    def now_ns(self) -> int:
        noise = self._rng.gauss(0.0, self.read_noise_s) if self.read_noise_s > 0 else 0.0
        return self.start_unix_ns + round((self._reading_s + noise) * _NS)

    def reading_ns(self) -> int:
        """:meth:`now_ns` without read noise (and without drawing from the noise stream, so
        observers do not change the run)."""
        return self.start_unix_ns + round(self._reading_s * _NS)

    def set_frequency(self, ppm: float) -> None:
        self.frequency_ppm = max(-self.max_frequency_ppm, min(self.max_frequency_ppm, ppm))
        self._rate = 1.0 + self.frequency_ppm * 1e-6
        self._anchor()

    def step(self, offset_ns: int) -> None:
        self.offsets_before_steps_s.append(self.offset_s())
        self._reading_s += offset_ns / _NS
        self.steps.append((self._t, offset_ns))
        self._anchor()

    def resume_after_pause(self, pause_s: float) -> None:
        """A snapshot restore: the clock stood still for ``pause_s`` true seconds and resumes
        where it stopped (no step of the guest's: not recorded in :attr:`steps`)."""
        self._reading_s -= pause_s
        self._anchor()

    def set_kernel_status(self, status: KernelStatus) -> None:
        self.kernel_status = status

    def true_offset_ns(self) -> int | None:
        return round(self.offset_s() * _NS)


def offsets_from_anchors(a_t: FloatArray, a_reading: FloatArray, a_p: FloatArray,
                         a_rate: FloatArray, oscillator: Oscillator, times_s: FloatArray
                         ) -> FloatArray:
    """Clock minus true time at ``times_s`` from a clock's anchors (see the module docstring):
    what :meth:`SimClock.offsets_at` returns, usable on anchors saved from an earlier run."""
    t = np.asarray(times_s, dtype=np.float64)
    i = np.searchsorted(a_t, t, side="right") - 1
    p = oscillator.phase_to_array(t)
    reading = a_reading[i] + a_rate[i] * ((t - a_t[i]) + (p - a_p[i]))
    return reading - t
