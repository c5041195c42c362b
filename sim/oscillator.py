"""Guest oscillator in true virtual time: base rate error, random-walk wander, extra term.

The rate error (ppm, positive: the uncorrected clock runs fast) is

    base_ppm + wander(t) + extra_ppm(t)

``wander`` is a random walk, piecewise constant over steps of ``step_s`` true seconds with
increments of ``wander_ppm_per_sqrt_s * sqrt(step_s)``; ``phase_s`` integrates it exactly.

Plugging in load coupling (the sim engineer's hook): pass ``extra_ppm`` (rate at a true time,
ppm) and, for exact integration, ``extra_mean_ppm(t0, t1)`` (its mean over an interval), e.g.
for a ``sim.load.LoadProfile`` ``load`` and a coupling ``k`` ppm per unit utilisation::

    Oscillator(base_ppm=-11.574, extra_ppm=lambda t: k * load(t),
               extra_mean_ppm=lambda a, b: k * load.mean(a, b))

Without ``extra_mean_ppm`` the extra term is integrated by the midpoint rule on ``step_s``
sub-intervals (accurate for terms that change slowly compared with ``step_s``).
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

_BLOCK = 4096
_CHUNK = 1 << 16
FloatArray = npt.NDArray[np.float64]


class Oscillator:
    """Rate error of an uncorrected clock; deterministic for a given ``rng`` state."""

    def __init__(self, base_ppm: float = 0.0, wander_ppm_per_sqrt_s: float = 0.0,
                 rng: random.Random | None = None, *, step_s: float = 1.0,
                 extra_ppm: Callable[[float], float] | None = None,
                 extra_mean_ppm: Callable[[float, float], float] | None = None) -> None:
        if step_s <= 0:
            raise ValueError("step_s: must be > 0")
        self.base_ppm = base_ppm
        self.step_s = step_s
        self.extra_ppm = extra_ppm
        self.extra_mean_ppm = extra_mean_ppm
        #: optional vectorised ``extra_mean_ppm(0, t)`` over an array of ``t`` (bit for bit)
        self.extra_mean_from_zero_ppm: Callable[[FloatArray], FloatArray] | None = None
        self._sigma = wander_ppm_per_sqrt_s * math.sqrt(step_s) * 1e-6
        seed = (rng or random.Random(0)).getrandbits(63)
        self._gen = np.random.default_rng(seed)
        # wander level of each step and the wander phase accumulated before it, as packed
        # doubles: a year at 10 s steps is 3.2 M steps, 8 bytes each here against ~32 in a
        # list (and no second copy in numpy blocks); indexing still gives plain floats, which
        # the engine's scalar hot path needs, and numpy views them without copying
        self._level = array("d")
        self._phase = array("d")
        self._next_level = 0.0
        self._next_phase = 0.0

    def _ensure(self, k: int) -> None:
        """Draw blocks until step ``k`` exists."""
        while len(self._level) <= k:
            self._grow()

    def _grow(self) -> None:
        if self._sigma > 0:
            inc = self._gen.normal(0.0, self._sigma, _BLOCK)
            steps = np.cumsum(inc)
            level = self._next_level + steps - inc  # level of step i
            end_level = self._next_level + float(steps[-1])
        else:
            level = np.full(_BLOCK, self._next_level)
            end_level = self._next_level
        before = np.concatenate(([0.0], np.cumsum(level)[:-1])) * self.step_s
        phase = self._next_phase + before
        self._next_phase = float(phase[-1] + level[-1] * self.step_s)
        self._next_level = end_level
        self._level.frombytes(level.tobytes())
        self._phase.frombytes(phase.tobytes())

    def _wander_phase(self, t: float) -> float:
        """Integral of the wander from 0 to ``t`` (t >= 0), seconds."""
        k = int(t / self.step_s)
        if k >= len(self._level):
            self._ensure(k)
        return self._phase[k] + self._level[k] * (t - k * self.step_s)

    def _wander_phase_array(self, t: FloatArray) -> FloatArray:
        """:meth:`_wander_phase` of each element (t >= 0), bit for bit."""
        if not len(t):
            return np.zeros(0)
        k = (t / self.step_s).astype(np.int64)  # truncation, as int() for t >= 0
        self._ensure(int(k.max()))
        # views, not copies, and not kept: the arrays must stay resizable for later growth
        level = np.frombuffer(self._level, dtype=np.float64)
        phase = np.frombuffer(self._phase, dtype=np.float64)
        return phase[k] + level[k] * (t - k.astype(np.float64) * self.step_s)

    def wander_ppm(self, t: float) -> float:
        k = int(max(t, 0.0) / self.step_s)
        if k >= len(self._level):
            self._ensure(k)
        return self._level[k] * 1e6

    def ppm_at(self, t: float) -> float:
        """Rate error at true time ``t``, ppm."""
        extra = self.extra_ppm(t) if self.extra_ppm is not None else 0.0
        k = int(max(t, 0.0) / self.step_s)
        if k >= len(self._level):
            self._ensure(k)
        return self.base_ppm + self._level[k] * 1e6 + extra

    def phase_s(self, t0: float, t1: float) -> float:
        """Time gained by the uncorrected clock over true ``[t0, t1]`` beyond ``t1 - t0``."""
        if t1 <= t0:
            return 0.0
        gained = self.base_ppm * 1e-6 * (t1 - t0)
        gained += self._wander_phase(t1) - self._wander_phase(t0)
        if self.extra_mean_ppm is not None:
            gained += self.extra_mean_ppm(t0, t1) * 1e-6 * (t1 - t0)
        elif self.extra_ppm is not None:
            n = max(1, math.ceil((t1 - t0) / self.step_s))
            h = (t1 - t0) / n
            gained += sum(self.extra_ppm(t0 + (i + 0.5) * h) for i in range(n)) * 1e-6 * h
        return gained

    def phase_to(self, t: float) -> float:
        """``phase_s(0, t)``, bit for bit: the clock integrates from 0 so that its reading does
        not depend on the instants at which it happened to be advanced."""
        if t <= 0.0:
            return 0.0
        gained = self.base_ppm * 1e-6 * t
        gained += self._wander_phase(t)  # minus _wander_phase(0) == 0.0: exact
        if self.extra_mean_ppm is not None:
            gained += self.extra_mean_ppm(0.0, t) * 1e-6 * t
        elif self.extra_ppm is not None:
            gained = self.phase_s(0.0, t)  # midpoint rule from 0: O(t / step_s) per call
        return gained

    def phase_to_array(self, times: FloatArray) -> FloatArray:
        """:meth:`phase_to` of each element, bit for bit, vectorised.

        The extra term is vectorised through ``extra_mean_from_zero_ppm`` when set (a function
        of an array of ``t`` equal element-wise to ``extra_mean_ppm(0, t)``), else called per
        element.
        """
        t = np.asarray(times, dtype=np.float64)
        if len(t) > _CHUNK:  # elementwise: chunks bound the temporaries (a year: ~10^6 t)
            out = np.empty(len(t))
            for i in range(0, len(t), _CHUNK):
                out[i:i + _CHUNK] = self._phase_to_array(t[i:i + _CHUNK])
            return out
        return self._phase_to_array(t)

    def _phase_to_array(self, t: FloatArray) -> FloatArray:
        pos = np.maximum(t, 0.0)
        out = self.base_ppm * 1e-6 * pos
        out = out + self._wander_phase_array(pos)
        if self.extra_mean_ppm is not None:
            if self.extra_mean_from_zero_ppm is not None:
                mean = self.extra_mean_from_zero_ppm(pos)
            else:
                f = self.extra_mean_ppm
                mean = np.fromiter((f(0.0, x) for x in pos.tolist()), np.float64, len(pos))
            out = out + mean * 1e-6 * pos
        elif self.extra_ppm is not None:
            out = np.array([self.phase_s(0.0, x) for x in pos.tolist()])
        out[t <= 0.0] = 0.0
        return out
