"""Slew plan: remove a phase offset by a temporary frequency change of bounded size.

Like Linux ``adjtimex``, corrections multiply the clock's rate: rate = (1+e)(1+c).
"""

from __future__ import annotations

import math


def slew_plan(offset: float, slope: float, max_slew_ppm: float, slew_time_s: float,
              base_limit_ppm: float | None = None) -> tuple[float, float]:
    """Frequency correction (fraction) and clock-time duration that remove ``offset``.

    ``slope`` is the native rate error; the base correction ``-slope`` stops drift, and an
    extra ``s`` makes the offset change at ``s/(1-slope+s)`` per clock second.
    """
    limit = max_slew_ppm * 1e-6
    base = -slope
    if base_limit_ppm is not None:
        base = max(-base_limit_ppm * 1e-6, min(base_limit_ppm * 1e-6, base))
    if offset == 0.0:
        return base, 0.0
    duration = max(abs(offset) / limit, slew_time_s)
    r = -offset / duration
    s = r * (1.0 - slope) / (1.0 - r)
    freq = base + s
    if abs(freq) > limit:
        freq = math.copysign(limit, freq)
        s = freq - base
        if s == 0.0 or (s > 0) != (offset < 0):
            return base, 0.0
        r = s / (1.0 - slope + s)
        duration = -offset / r
    return freq, duration
