"""Frequency/phase estimation: a weighted least-squares line over a source's samples.

``fit`` weights samples by excess delay and sizes the window by a runs test on the residuals,
as chrony does: when the residual signs cluster, the oldest samples no longer fit a line and
are dropped. Samples are in the uncorrected time scale (``timesyncd.correction``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

from timesyncd import fit_window as fit_window_choice
from timesyncd.filter import (
    ERROR_FLOOR_S,
    FilteredSample,
    FitWindow,
    SampleFilter,
    floor_weight,
    sample_variance,
)

#: The runs test never shrinks a window below this many samples.
MIN_WINDOW = 16
#: Runs-test threshold, standard deviations (about 1 % one-sided). Each update runs the test
#: and a failure prunes the window for good, so at 5 % false alarms under heavy queueing
#: (vsock at peak load) cut the window to a few minutes of noisy samples every few hours.
RUNS_Z = 2.33
#: Ridge width on the slope while a window fills (fraction): how far a few seconds of samples
#: may move the frequency from the current estimate. A longer span's data outweighs it (the
#: 100 ppm lan-reference clock still converges in 17 s); see :func:`fit_early`.
PRIOR_SLOPE_SD = 30e-6
#: Error bounds of older samples widen by this many slope standard errors per second of age.
BOUND_SLOPE_SDS = 4.0


@dataclass(frozen=True, slots=True)
class Estimate:
    """Regression result for one source, evaluated at uncorrected time ``x``."""

    x: float
    offset: float  # uncorrected clock minus source at x
    slope: float  # d(offset)/dx: native rate error as a fraction of uncorrected time
    offset_sd: float
    slope_sd: float
    used: int  # samples the runs test kept
    total: int


_Fit = tuple[float, float, float, float]  # (offset, slope, offset_sd, slope_sd), local coords


def _regress(win: FitWindow, a: int, at: float) -> _Fit:
    """Weighted line fit over rows ``[a, end)`` of ``win`` from its prefix sums.

    ``at`` is the evaluation point in the window's local x; offset and slope are in its
    detrended coordinates (add ``y0 + s0 * at`` and ``s0`` for the real ones)."""
    sw, swx, swy, swxx, swxy, swyy = win.moments(a)
    n = len(win.X) - a
    xm = swx / sw
    ym = swy / sw
    sxx = swxx - swx * xm
    sxy = swxy - swx * ym
    if sxx > 0:
        slope = sxy / sxx
        chi2 = max(swyy - swy * ym - slope * sxy, 0.0)
    else:  # no spread in x: no slope information (the real slope is 0, as before)
        slope = -win.s0
        chi2 = 0.0
    scale = max(chi2 / (n - 2), 1.0) if n > 2 else 1.0
    dx = xm - at
    offset = ym - slope * dx
    offset_var = scale * (1.0 / sw + (dx * dx / sxx if sxx > 0 else 0.0))
    slope_sd = math.sqrt(scale / sxx) if sxx > 0 else math.inf
    return offset, slope, math.sqrt(offset_var), slope_sd


def _median(values: list[float]) -> float:
    """Median of sorted ``values`` (mean of the middle two for an even count)."""
    k = len(values) // 2
    return values[k] if len(values) % 2 else (values[k - 1] + values[k]) / 2


def _runs_ok(win: FitWindow, a: int, slope: float, offset: float, at: float, z: float) -> bool:
    """Wald-Wolfowitz runs test on the residual signs of the better half of rows ``[a, end)``
    (by weight): too few runs means the line is stale.

    Only the better half carries a trend's signature; the others are mostly queueing noise
    whose signs would only add false alarms."""
    w = win.w
    med = _median(win.sorted_w if a == win.lo else sorted(w[a:]))
    c = offset - slope * at  # residual = Y - slope * X - c
    signs = [y - slope * x > c for x, y, wi in zip(win.X[a:], win.Y[a:], w[a:], strict=True)
             if wi >= med]
    n = len(signs)
    pos = sum(signs)
    neg = n - pos
    if pos == 0 or neg == 0:  # all on one side: stale, unless the fit is exact
        return n < 4 or max(abs(y - slope * x - c) for x, y, wi
                            in zip(win.X[a:], win.Y[a:], w[a:], strict=True)
                            if wi >= med) < 1e-12
    runs = 1 + sum(map(operator.ne, signs, islice(signs, 1, None)))
    p2 = 2.0 * pos * neg
    mean = p2 / n + 1.0
    var = p2 * (p2 - n) / (n * n * (n - 1.0))
    return runs >= mean - z * math.sqrt(max(var, 0.0))


def _bound_offset(win: FitWindow, a: int, at: float, fitted: _Fit) -> tuple[float, float]:
    """Offset at ``at`` from the intersection of the samples' error bounds.

    Queueing only adds delay, so a sample's offset error lies within half its excess delay
    over the path's floor; projected to ``at`` along the fitted slope (widened by the
    slope's uncertainty) every sample bounds the offset. When the bounds intersect, its
    midpoint is a far better estimate than the least-squares mean (errors are bounded, not
    Gaussian); when they do not (floor or slope off), the regression stands.
    """
    offset, slope, offset_sd, slope_sd = fitted
    k = BOUND_SLOPE_SDS * slope_sd
    X = win.X[a:]
    if win.x_max <= at:  # every sample is older than ``at``: |X - at| = at - X
        u, v = slope - k, slope + k
        if win.monotonic:  # X[a] and X[-1] span the rows: search from the tightest bounds
            xc, d = (X[0] + X[-1]) / 2, (X[-1] - X[0]) / 2
            lo = _envelope(win.lo_order, win.X, a, u, xc, d) + u * at
            hi = v * at - _envelope(win.hi_order, win.X, a, -v, xc, d)
        else:
            lo = max([yl - u * x for x, yl in zip(X, win.YLO[a:], strict=True)]) + u * at
            hi = min([yh - v * x for x, yh in zip(X, win.YHI[a:], strict=True)]) + v * at
    else:
        lo = max([yl - slope * (x - at) - k * abs(x - at)
                  for x, yl in zip(X, win.YLO[a:], strict=True)])
        hi = min([yh - slope * (x - at) + k * abs(x - at)
                  for x, yh in zip(X, win.YHI[a:], strict=True)])
    if lo > hi:
        return offset, offset_sd
    return (lo + hi) / 2, min(offset_sd, (hi - lo) / 2)


def _envelope(order: list[tuple[float, int]], X: list[float], a: int, slope: float,
              xc: float, d: float) -> float:
    """``max(-key - slope * X[row])`` over the rows ``>= a`` of ``order`` ((key, row) pairs,
    ascending key), with every such ``X`` within ``xc +- d``.

    Walks the rows from the largest ``-key`` and stops once no later one can win: a row's
    value is at most ``-key - slope * xc + |slope| * d``. The tight samples come first and
    decide, so this visits a handful of rows instead of the whole window."""
    best = -math.inf
    reach = abs(slope) * d - slope * xc
    for key, row in order:
        if row < a:
            continue
        if reach - key <= best:
            break
        value = -key - slope * X[row]
        if value > best:
            best = value
    return best


def fit(samples: Sequence[FilteredSample], at_x: float, prior_slope: float = 0.0,
        runs_z: float = RUNS_Z, floor: float | None = None) -> Estimate | None:
    """Estimate offset (at ``at_x``) and slope from a source's samples, oldest first.

    The window starts at the samples within :mod:`timesyncd.fit_window`'s span cap and
    shrinks (oldest dropped, in quarters) until the runs test accepts the residuals; ``used``
    tells the caller how many to keep.
    With a single sample the slope is ``prior_slope`` (the last known frequency).
    ``floor`` is the path's queue-free delay (``SampleFilter.delay_floor``): it sets the
    weights and bounds each sample's error; without it the window's own smallest delays
    stand in for it (weights only).
    """
    n = len(samples)
    if n == 0:
        return None
    if n == 1:
        s = samples[0]
        sd = math.sqrt(sample_variance(s, s.delay_s))
        return Estimate(at_x, s.y + prior_slope * (at_x - s.x), prior_slope, sd, math.inf, 1, 1)
    if floor is not None:
        rows = [(s.x, s.y) + floor_weight(s.delay_s, s.dispersion_s, floor) for s in samples]
    else:
        # The window's minimum delay is itself above the path's true minimum by about the gap
        # between the smallest delays, so no sample is trusted beyond that.
        k = min(4, n - 1)
        low = sorted(s.delay_s for s in samples)[: k + 1]
        gap = (low[-1] - low[0]) / k
        rows = []
        for s in samples:
            excess = s.delay_s - low[0] + gap
            rows.append((s.x, s.y, 1.0 / (ERROR_FLOOR_S**2 + s.dispersion_s**2
                                          + excess * excess / 12.0), 0.0))
    return fit_window(FitWindow(rows), at_x, runs_z, bounded=floor is not None)


def fit_filter(f: SampleFilter, at_x: float, prior_slope: float = 0.0,
               runs_z: float = RUNS_Z) -> Estimate | None:
    """:func:`fit` on a source's filter, with the path floor it tracks (no copies)."""
    if len(f) < 2:
        latest = f.latest()
        return fit([latest] if latest is not None else [], at_x, prior_slope, runs_z)
    return fit_window(f.window, at_x, runs_z, bounded=True)


def fit_early(samples: Sequence[FilteredSample], at_x: float, prior_slope: float = 0.0,
              prior_sd: float = PRIOR_SLOPE_SD) -> Estimate:
    """Line fit for a window still filling (at least two samples), when the path's floor is
    unknown.

    A sample's offset error then lies only within half its whole delay (the floor may be
    near zero), about uniform: variance ``delay**2 / 12``. Trusting the smallest delay seen
    so far as exact instead, a slope from a few samples a few seconds apart was off by
    hundreds of ppm under vsock queueing, and applied as a frequency it walked the clock off
    by milliseconds. The slope is also pulled toward ``prior_slope`` (the caller's current
    frequency estimate) by a ridge term of width ``prior_sd``, so a span of seconds cannot
    swing it; the prior comes from the same early samples, so this smooths rather than adds
    information, and from ``MIN_WINDOW`` samples on the regular fit takes over.
    """
    rows = [(s.x - samples[0].x, s.y, 1.0 / (ERROR_FLOOR_S**2 + s.dispersion_s**2
                                            + s.delay_s * s.delay_s / 12.0)) for s in samples]
    sw = math.fsum(w for _, _, w in rows)
    xm = math.fsum(w * x for x, _, w in rows) / sw
    ym = math.fsum(w * y for _, y, w in rows) / sw
    sxx = math.fsum(w * (x - xm) ** 2 for x, _, w in rows)
    sxy = math.fsum(w * (x - xm) * (y - ym) for x, y, w in rows)
    ridge = 1.0 / (prior_sd * prior_sd)
    slope = (sxy + ridge * prior_slope) / (sxx + ridge)
    slope_var = 1.0 / (sxx + ridge)
    dx = at_x - samples[0].x - xm
    offset = ym + slope * dx
    offset_sd = math.sqrt(1.0 / sw + dx * dx * slope_var)
    n = len(samples)
    return Estimate(at_x, offset, slope, offset_sd, math.sqrt(slope_var), n, n)


def fit_window(win: FitWindow, at_x: float, runs_z: float = RUNS_Z,
               bounded: bool = True) -> Estimate:
    """:func:`fit` on a window of at least two rows; ``bounded`` applies the error bounds."""
    n = len(win)
    at = at_x - win.x0
    a, result = fit_window_choice.choose(win, at, runs_z, _regress, _runs_ok)
    offset, slope, offset_sd, slope_sd = result
    if bounded and math.isfinite(slope_sd):
        offset, offset_sd = _bound_offset(win, a, at, result)
    base = win.y0 + win.s0 * at
    return Estimate(at_x, base + offset, win.s0 + slope, offset_sd, slope_sd, len(win.X) - a, n)
