"""The exact record of the corrections applied to the clock, defining the uncorrected scale.

Like Linux ``adjtimex``, corrections multiply the clock's rate: rate = (1+e)(1+c).
"""

from __future__ import annotations


class CorrectionModel:
    """Exact record of the corrections applied to the clock (frequency x time, and steps).

    ``correction_at(t)`` is how far the corrected clock reading ``t`` is ahead of the
    uncorrected one. With rate = (1+e)(1+c), the uncorrected clock advances dt/(1+c) while
    the clock advances dt, so a correction c contributes c/(1+c) per second of clock time.
    """

    def __init__(self, t0: float = 0.0, freq: float = 0.0) -> None:
        # segments: (start clock time, correction at start, correction per clock second)
        self._segments: list[tuple[float, float, float]] = [(t0, 0.0, freq / (1.0 + freq))]
        self.freq = freq  # current total correction (fraction, not ppm)
        self._freq_last = False  # the newest segment is a frequency change (not a step)

    def correction_at(self, t: float) -> float:
        # Newest segment first, with 1 ns of slack: right after a backward step the caller's
        # clock reading may round a hair below the step segment's start, and the segments
        # before it (from the readings the step repeats) would then answer wrongly.
        for start, c0, k in reversed(self._segments):
            if t >= start - 1e-9:
                return c0 + k * (t - start)
        start, c0, k = self._segments[0]
        return c0 + k * (t - start)

    def uncorrected(self, t: float) -> float:
        return t - self.correction_at(t)

    def set_frequency(self, t: float, freq: float) -> None:
        c = self.correction_at(t)
        self._segments.append((t, c, freq / (1.0 + freq)))
        self.freq = freq
        self._freq_last = True
        del self._segments[:-16]

    def applied_at(self, t: float) -> None:
        """The newest frequency change took effect at clock reading ``t``, not when it was
        decided: the previous rate ran until then. (A driver applies a change after the
        event that decided it, under load milliseconds later: mid-slew, 83 us per ms.)"""
        if not self._freq_last or len(self._segments) < 2 or t <= self._segments[-1][0]:
            return  # the newest segment is a step (a step's time changes nothing)
        start, c0, k = self._segments[-2]
        self._segments[-1] = (t, c0 + k * (t - start), self._segments[-1][2])

    def step(self, t: float, delta: float) -> None:
        """The clock read ``t`` and was moved by ``delta``; it now reads ``t + delta``."""
        c = self.correction_at(t)
        self._segments.append((t + delta, c + delta, self.freq / (1.0 + self.freq)))
        self._freq_last = False
        del self._segments[:-16]
