"""Clock discipline: configuration, frequency/phase estimation, slew and poll decisions.

The model (sans-IO, no clock reads here):

* The controller records every correction it applies (``CorrectionModel``): frequency
  corrections integrated over time plus steps. Subtracting them from the clock gives the
  *uncorrected* time scale, in which a source's samples lie on a straight line whose slope is
  the native rate error. Stored samples therefore never need rewriting after a slew or step.
* ``fit`` is a weighted least-squares regression over recent samples (weights from excess
  delay) with the window sized by :mod:`timesyncd.fit_window`: a span cap from the measured
  noise and the wander, then a runs test on the residuals, as chrony does: when the
  residual signs cluster, the oldest samples no longer fit a line and are dropped.
* ``slew_plan`` removes the estimated phase by a temporary frequency change of bounded size
  (like Linux ``adjtimex``, corrections multiply the clock's rate: rate = (1+e)(1+c)).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class DisciplineConfig:
    """Tunables of the guest clock discipline (defaults suit a vsock relay to a LAN source)."""

    minpoll: int = field(default=2, metadata={
        "help": "shortest poll interval, log2 seconds", "min": -2, "max": 17})
    maxpoll: int = field(default=5, metadata={
        "help": "longest poll interval, log2 seconds", "min": -2, "max": 17})
    burst: int = field(default=4, metadata={
        "help": "requests sent 2 s apart at start and after a reconnect", "min": 0, "max": 16})
    step_threshold_s: float = field(default=1.0, metadata={
        "help": "offsets larger than this are stepped (first step_limit updates only)",
        "min": 0.0})
    step_limit: int = field(default=3, metadata={
        "help": "number of initial clock updates during which stepping is allowed", "min": 0})
    max_slew_ppm: float = field(default=83_333.0, metadata={
        "help": "largest frequency change used to slew the phase, ppm", "min": 1.0,
        "max": 100_000.0})
    slew_time_s: float = field(default=1.0, metadata={
        "help": "shortest duration of a phase correction, seconds", "min": 0.001})
    max_root_distance_s: float = field(default=1.5, metadata={
        "help": "samples with a larger root distance are rejected", "min": 0.0})
    max_samples: int = field(default=128, metadata={
        "help": "regression window limit, samples per source", "min": 4, "max": 512})
    max_delay_dev_ratio: float = field(default=10.0, metadata={
        "help": ("reject samples whose excess delay exceeds this many median excess delays "
                 "(0: never); when most of the last 5 do, the path got slower and they are "
                 "kept"),
        "min": 0.0})
    jump_confirm_samples: int = field(default=3, metadata={
        "help": "consecutive agreeing samples needed to step a large jump after a "
        "discontinuity", "min": 1})
    outage_s: float = field(default=300.0, metadata={
        "help": "no usable sample for this long counts as a discontinuity (like a restored "
        "snapshot)", "min": 0.0})
    holdover_polls: int = field(default=4, metadata={
        "help": "missed poll intervals before entering holdover", "min": 1})
    holdover_drift_ppm: float = field(default=1.0, metadata={
        "help": "assumed frequency uncertainty in holdover; grows the error bound", "min": 0.0})
    max_error_s: float = field(default=1.0, metadata={
        "help": "error bound at or beyond which the guest is unsynchronised", "min": 0.0})
    max_clock_error_ppm: float = field(default=10.0, metadata={
        "help": "frequency-error allowance that grows the error bound between updates, ppm "
        "(like chrony's maxclockerror); the default covers the largest frequency error "
        "measured across the simulator's scenarios (docs/BENCHMARKS.md)", "min": 0.0})
    sync_max_correction_s: float = field(default=0.01, metadata={
        "help": "synchronised only while the correction still to apply (the rest of a slew) "
        "is below this, seconds", "min": 0.0})
    leap_mode: str = field(default="kernel", metadata={
        "help": "pass the sources' leap warning to the kernel, or ignore it (smearing "
        "upstreams)", "choices": ("kernel", "ignore")})

    def __post_init__(self) -> None:
        if self.minpoll > self.maxpoll:
            raise ValueError("minpoll: larger than maxpoll; lower minpoll or raise maxpoll")
        if self.leap_mode not in ("kernel", "ignore"):
            raise ValueError("leap_mode: must be 'kernel' or 'ignore'")


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
        del self._segments[:-16]

    def step(self, t: float, delta: float) -> None:
        """The clock read ``t`` and was moved by ``delta``; it now reads ``t + delta``."""
        c = self.correction_at(t)
        self._segments.append((t + delta, c + delta, self.freq / (1.0 + self.freq)))
        del self._segments[:-16]


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


@dataclass(slots=True)
class PollState:
    """Adaptive poll exponent of one source: up after a run of good fits, down on trouble."""

    poll: int
    score: int = 0

    def update(self, est: Estimate, minpoll: int, maxpoll: int) -> None:
        if est.used < est.total // 2 or est.used < 3:
            self.score -= 2  # the model went stale quickly: sample more often
        elif est.used >= 8:
            self.score += 1
        if self.score >= 4:
            self.poll = min(self.poll + 1, maxpoll)
            self.score = 0
        elif self.score <= -4:
            self.poll = max(self.poll - 1, minpoll)
            self.score = 0
        self.poll = max(minpoll, min(maxpoll, self.poll))
