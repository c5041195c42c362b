"""Clock discipline: configuration, frequency/phase estimation, slew and poll decisions.

The model (sans-IO, no clock reads here):

* The controller records every correction it applies (``CorrectionModel``): frequency
  corrections integrated over time plus steps. Subtracting them from the clock gives the
  *uncorrected* time scale, in which a source's samples lie on a straight line whose slope is
  the native rate error. Stored samples therefore never need rewriting after a slew or step.
* ``fit`` is a weighted least-squares regression over recent samples (weights from excess
  delay) with the window sized by a runs test on the residuals, as chrony does: when the
  residual signs cluster, the oldest samples no longer fit a line and are dropped.
* ``slew_plan`` removes the estimated phase by a temporary frequency change of bounded size
  (like Linux ``adjtimex``, corrections multiply the clock's rate: rate = (1+e)(1+c)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from timesyncd.filter import ERROR_FLOOR_S, FilteredSample, sample_variance

FloatArray = npt.NDArray[np.float64]

#: The runs test never shrinks a window below this many samples.
MIN_WINDOW = 16
#: Added to every excess delay over the floor: the floor itself is a sample, not the truth.
FLOOR_MARGIN_S = 10e-6
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
        "help": "reject samples whose excess delay exceeds this many median excess delays",
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
        "help": "error bound beyond which holdover becomes unsynchronised", "min": 0.0})
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


def _regress(x: FloatArray, y: FloatArray, w: FloatArray
             ) -> tuple[float, float, float, float, FloatArray]:
    """Weighted line fit with x relative to the evaluation time.

    Returns (offset at x=0, slope, offset_sd, slope_sd, residuals)."""
    sw = float(w.sum())
    xbar = float(w @ x) / sw
    ybar = float(w @ y) / sw
    dx = x - xbar
    wdx = w * dx
    sxx = float(wdx @ dx)
    slope = float(wdx @ (y - ybar)) / sxx if sxx > 0 else 0.0
    resid = y - ybar - slope * dx
    n = len(x)
    chi2 = float(w @ (resid * resid))
    scale = max(chi2 / (n - 2), 1.0) if n > 2 else 1.0
    offset = ybar - slope * xbar
    offset_var = scale * (1.0 / sw + (xbar * xbar / sxx if sxx > 0 else 0.0))
    slope_sd = math.sqrt(scale / sxx) if sxx > 0 else math.inf
    return offset, slope, math.sqrt(offset_var), slope_sd, resid


def _runs_ok(resid: FloatArray, z: float) -> bool:
    """Wald-Wolfowitz runs test on residual signs: too few runs means the line is stale."""
    signs = resid > 0
    n = len(signs)
    pos = int(np.count_nonzero(signs))
    neg = n - pos
    if pos == 0 or neg == 0:  # all on one side: stale, unless the fit is exact
        return n < 4 or float(np.abs(resid).max()) < 1e-12
    runs = 1 + int(np.count_nonzero(signs[1:] != signs[:-1]))
    p2 = 2.0 * pos * neg
    mean = p2 / n + 1.0
    var = p2 * (p2 - n) / (n * n * (n - 1.0))
    return runs >= mean - z * math.sqrt(max(var, 0.0))


def fit(samples: Sequence[FilteredSample], at_x: float, prior_slope: float = 0.0,
        runs_z: float = 1.64, floor: float | None = None) -> Estimate | None:
    """Estimate offset (at ``at_x``) and slope from a source's samples, oldest first.

    The window starts at all samples and shrinks (oldest dropped, in quarters) until the
    runs test accepts the residuals; ``used`` tells the caller how many to keep.
    With a single sample the slope is ``prior_slope`` (the last known frequency).
    """
    n = len(samples)
    if n == 0:
        return None
    if n == 1:
        s = samples[0]
        sd = math.sqrt(sample_variance(s, s.delay_s))
        return Estimate(at_x, s.y + prior_slope * (at_x - s.x), prior_slope, sd, math.inf, 1, 1)
    return fit_arrays(np.array([s.x for s in samples]), np.array([s.y for s in samples]),
                      np.array([s.delay_s for s in samples]),
                      np.array([s.dispersion_s for s in samples]), at_x, prior_slope, runs_z,
                      floor)


def fit_arrays(x: FloatArray, y: FloatArray, delay: FloatArray, disp: FloatArray, at_x: float,
               prior_slope: float = 0.0, runs_z: float = 1.64,
               floor: float | None = None) -> Estimate | None:
    """:func:`fit` on columns (x, y, delay, dispersion), as ``SampleFilter.arrays`` gives.

    ``floor`` is the path's queue-free delay (``SampleFilter.delay_floor``); without it the
    window's own smallest delays stand in for it.
    """
    n = len(x)
    if n < 2:
        return fit([FilteredSample(float(x[i]), float(y[i]), float(delay[i]), float(disp[i]),
                                   0.0) for i in range(n)], at_x, prior_slope, runs_z)
    x = x - at_x
    if floor is not None:
        excess = np.maximum(delay - floor, 0.0) + FLOOR_MARGIN_S
    else:
        # The window's minimum delay is itself above the path's true minimum by about the gap
        # between the smallest delays, so no sample is trusted beyond that.
        k = min(4, n - 1)
        low = np.partition(delay, k)[: k + 1]
        d_min = float(low.min())
        excess = delay - d_min + (float(low.max()) - d_min) / k
    w = 1.0 / (ERROR_FLOOR_S**2 + disp * disp + excess * excess / 12.0)
    start = 0
    result = _regress(x, y, w)
    # Only residuals of the better half of the samples (by weight) carry a trend's signature;
    # the others are mostly queueing noise whose signs would only add false alarms.
    while n - start > MIN_WINDOW and not _runs_ok(
            result[4][w[start:] >= np.median(w[start:])], runs_z):
        start = min(start + max((n - start) // 4, 1), n - MIN_WINDOW)
        result = _regress(x[start:], y[start:], w[start:])
    offset, slope, offset_sd, slope_sd, _ = result
    if floor is not None and math.isfinite(slope_sd):
        offset, offset_sd = _bound_offset(x[start:], y[start:], excess[start:], disp[start:],
                                          offset, slope, offset_sd, slope_sd)
    return Estimate(at_x, offset, slope, offset_sd, slope_sd, n - start, n)


def _bound_offset(x: FloatArray, y: FloatArray, excess: FloatArray, disp: FloatArray,
                  offset: float, slope: float, offset_sd: float, slope_sd: float
                  ) -> tuple[float, float]:
    """Offset at x=0 from the intersection of the samples' error bounds.

    Queueing only adds delay, so a sample's offset error lies within half its excess delay
    over the path's floor; projected to x=0 along the fitted slope (widened by the slope's
    uncertainty) every sample bounds the offset. When the bounds intersect, its midpoint is
    a far better estimate than the least-squares mean (errors are bounded, not Gaussian);
    when they do not (floor or slope off), the regression stands.
    """
    proj = y - slope * x
    half = excess / 2 + disp + BOUND_SLOPE_SDS * slope_sd * np.abs(x)
    lo = float((proj - half).max())
    hi = float((proj + half).min())
    if lo > hi:
        return offset, offset_sd
    return (lo + hi) / 2, min(offset_sd, (hi - lo) / 2)


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
