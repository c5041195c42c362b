"""``SimClock``: a ``timesyncd.clock.Clock`` in true virtual time, integrated exactly.

Between events the reading advances by ``(1 + c) * (dt + phase)`` where ``phase`` is the
oscillator's exact integral over the interval and ``c`` the applied frequency correction:
corrections *multiply* the oscillator's rate, as Linux applies ``adjtimex`` frequency and
tick (no tick granularity is modelled). Steps add to the reading. Read noise (Gaussian) only
affects what ``now_ns`` returns, never the clock itself.
"""

from __future__ import annotations

import random

from sim.oscillator import Oscillator
from timesyncd.clock import Clock, KernelStatus

_NS = 1_000_000_000


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
        self._reading_s = initial_offset_s  # reading minus start_unix, seconds
        self.frequency_ppm = 0.0
        self.kernel_status = KernelStatus(synchronised=False)
        self.steps: list[tuple[float, int]] = []  # (true_s, offset_ns)

    @property
    def true_s(self) -> float:
        return self._t

    def advance_to(self, true_s: float) -> None:
        """Move true time forward (never back) to ``true_s``."""
        if true_s <= self._t:
            return
        dt = true_s - self._t
        gained = self.oscillator.phase_s(self._t, true_s)
        self._reading_s += (1.0 + self.frequency_ppm * 1e-6) * (dt + gained)
        self._t = true_s

    def offset_s(self) -> float:
        """Exact clock minus true time, seconds (no read noise)."""
        return self._reading_s - self._t

    def rate_error_ppm(self) -> float:
        """Current rate of the corrected clock relative to true time, minus one, ppm."""
        e = self.oscillator.ppm_at(self._t) * 1e-6
        return ((1.0 + e) * (1.0 + self.frequency_ppm * 1e-6) - 1.0) * 1e6

    def true_time_at(self, reading_ns: int) -> float:
        """Approximate true time at which the clock will read ``reading_ns`` (rate held)."""
        rate = 1.0 + self.rate_error_ppm() * 1e-6
        target = (reading_ns - self.start_unix_ns) / _NS
        return self._t + max(target - self._reading_s, 0.0) / rate

    # --- Clock interface ---------------------------------------------------------------------
    def now_ns(self) -> int:
        noise = self._rng.gauss(0.0, self.read_noise_s) if self.read_noise_s > 0 else 0.0
        return self.start_unix_ns + round((self._reading_s + noise) * _NS)

    def set_frequency(self, ppm: float) -> None:
        self.frequency_ppm = max(-self.max_frequency_ppm, min(self.max_frequency_ppm, ppm))

    def step(self, offset_ns: int) -> None:
        self._reading_s += offset_ns / _NS
        self.steps.append((self._t, offset_ns))

    def set_kernel_status(self, status: KernelStatus) -> None:
        self.kernel_status = status

    def true_offset_ns(self) -> int | None:
        return round(self.offset_s() * _NS)
