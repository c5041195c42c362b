"""How much history the regression uses: chosen from the measured noise and the wander.

A line fit over a window of span ``T`` at poll ``tau`` averages white measurement noise of
variance ``s2`` per sample to about ``4 * s2 * tau / T`` at its newest end, while a frequency
random walk of intensity ``q`` bends the real phase away from any line by about
``q * T**3 / 20``. Their sum is smallest at ``T* = (80 * s2 * tau / (3 * q)) ** 0.25`` (the
Allan intercept of the two noises, for a fit). The window is therefore capped at
``SPAN_FACTOR * T*`` (never below ``MIN_ROWS`` samples), with ``s2`` measured from the window's
own weights (a sample's weight is the inverse of its offset variance: ``n / sum(w)``) and ``q``
at least :data:`MIN_WANDER` (a crystal's random walk); inside the cap chrony's runs test still
shrinks the window when the residuals show a trend the noise cannot explain (load-driven
wander, a frequency jump), down to :data:`RUNS_MIN_ROWS` samples (the cap alone goes down to
``MIN_ROWS``: at long polls the runs test has too few samples to judge). After a gap in the
samples (a relay outage) the cap keeps rows from before the gap until the new ones span half
of it (:func:`keep_baseline`): a slope needs a baseline, not just a count of rows.

Per-sample weights are capped: no sample carries more than :data:`MAX_WEIGHT_SHARE` of the
chosen window's weight (more for windows of a few samples, which cannot all be under it), so
one sample whose delay came out far below the others cannot hold the fit alone; a delay
clamped to zero is also weighted by its distance from the path floor, not as a perfect one
(:func:`timesyncd.filter.floor_weight`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable

from timesyncd.filter import FitWindow

#: Smallest window the span cap leaves, samples: a slope needs two, the noise a few more.
MIN_ROWS = 4
#: The runs test never shrinks a window below this many samples (below it has little power).
RUNS_MIN_ROWS = 16
#: Smallest frequency random walk assumed, per second (intensity q = MIN_WANDER**2): 1e-9
#: per sqrt second is a good crystal at constant temperature (chrony's test model).
MIN_WANDER = 1e-9
#: The span cap as a multiple of the optimum above (the optimum is shallow: the runs test
#: trims within it, so the cap errs long).
SPAN_FACTOR = 2.0
#: Largest share of the window's total weight one sample may carry.
#: Half: no sample outweighs all the others together. (1/8 cost the default scenario's
#: queueing-heavy path 0.14 ms of max offset on seed 3, 1/4 0.012 ms on seed 5: there a few
#: queue-free samples legitimately carry most of the information.)
MAX_WEIGHT_SHARE = 1.0 / 2.0

#: After a gap, the span cap keeps rows from before it until the rows inside the cap span at
#: least this share of the cap (see :func:`keep_baseline`). Without a gap the rows inside the
#: cap always span at least ``cap - poll`` or ``MIN_ROWS - 1`` polls, never less than half.
GAP_SPAN_SHARE = 0.5

_Fit = tuple[float, float, float, float]


def span_cap_s(win: FitWindow, a: int, wander: float = MIN_WANDER) -> float:
    """Longest useful window span (seconds) for rows ``[a, end)`` of ``win``."""
    n = len(win.X) - a
    if n < 2:
        return math.inf
    span = win.X[-1] - win.X[a]
    tau = span / (n - 1) if span > 0 else 0.0
    sw = win.pw[-1] - win.pw[a]
    if tau <= 0 or sw <= 0:
        return math.inf
    s2 = n / sw
    return SPAN_FACTOR * (80.0 * s2 * tau / (3.0 * wander * wander)) ** 0.25


def choose(win: FitWindow, at: float, runs_z: float,
           regress: Callable[[FitWindow, int, float], _Fit],
           runs_ok: Callable[[FitWindow, int, float, float, float, float], bool],
           ) -> tuple[int, _Fit]:
    """First row (absolute) of the rows of ``win`` to fit, and their fit (with the largest
    weights capped when one row would carry more than its share)."""
    n = len(win)
    lo = win.lo
    start = 0
    cap = span_cap_s(win, lo)
    if math.isfinite(cap) and n > MIN_ROWS:
        oldest = win.X[-1] - cap
        last = lo + n - MIN_ROWS
        if win.monotonic:
            start = bisect_left(win.X, oldest, lo, last) - lo
        else:
            while lo + start < last and win.X[lo + start] < oldest:
                start += 1
        start = keep_baseline(win, lo, start, cap)
    floor_rows = min(n - start, RUNS_MIN_ROWS)
    result = regress(win, lo + start, at)
    while n - start > floor_rows and not runs_ok(win, lo + start, result[1], result[0], at,
                                                 runs_z):
        start = min(start + max((n - start) // 4, 1), n - floor_rows)
        result = regress(win, lo + start, at)
    if n - start >= 2 and weight_capped(win, lo + start):
        result = regress(capped_moments(win, lo + start), 0, at)  # type: ignore[arg-type]
    return lo + start, result


def keep_baseline(win: FitWindow, lo: int, start: int, cap: float) -> int:
    """``start`` moved back (towards ``lo``) until rows ``[lo + start, end)`` span at least
    :data:`GAP_SPAN_SHARE` of ``cap``.

    The cap trades the noise a longer span averages away against the wander it lets in; it
    assumes the rows fill the span. After a gap (a relay outage) they do not: the rows inside
    the cap are the few taken since the reconnect, seconds apart, and a line through them
    has a slope off by a hundred ppm (``--outage 2d:6h`` seed 6: 4 samples over 8 s gave
    +114 ppm, sd 177 ppm, for a clock at -12 ppm, and the discipline took it as the clock's
    frequency). The rows from before the gap
    give the slope a baseline of the gap's length (chrony keeps its samples, and so its
    frequency, through a gap in the same way); they leave once the new rows span half the
    cap. Without a gap this never moves ``start`` (see :data:`GAP_SPAN_SHARE`)."""
    end = win.X[-1]
    floor = GAP_SPAN_SHARE * cap
    while start > 0 and end - win.X[lo + start] < floor:
        start -= 1
    return start


def _share(n: int) -> float:
    """Largest weight share for ``n`` rows (a few rows cannot all be under 1/8)."""
    return max(MAX_WEIGHT_SHARE, 1.5 / n)


def weight_capped(win: FitWindow, a: int) -> bool:
    """Whether one row of ``[a, end)`` carries more than its share of the rows' weight."""
    sw = win.pw[-1] - win.pw[a]
    return sw > 0 and max(win.w[a:]) > _share(len(win.X) - a) * sw


class _Capped:
    """The moments of rows ``[a, end)`` of a window with capped weights, in the window's
    coordinates: what the regression reads (``moments``, ``X``, ``s0``)."""

    __slots__ = ("X", "s0", "_sums")

    def __init__(self, X: list[float], s0: float,
                 sums: tuple[float, float, float, float, float, float]) -> None:
        self.X, self.s0, self._sums = X, s0, sums

    def moments(self, a: int) -> tuple[float, float, float, float, float, float]:
        return self._sums


def capped_moments(win: FitWindow, a: int) -> _Capped:
    """Rows ``[a, end)`` of ``win`` with each weight at most the share of the capped total:
    the cap ``c = share * sum(min(w, c))``. With the ``k`` largest weights capped,
    ``c = share * rest / (1 - share * k)`` (``rest``: the sum of the others); the first ``k``
    whose cap lies between its row's weight and the next one's is the solution. Only the
    regression changes; each sample's error bound does not depend on its weight."""
    w = win.w[a:]
    share = _share(len(w))
    desc = sorted(w, reverse=True)
    rest = math.fsum(desc)
    c = desc[0]
    for k in range(1, len(desc)):
        rest -= desc[k - 1]
        if share * k >= 1.0:
            break
        c = share * rest / (1.0 - share * k)
        if c >= desc[k]:
            break
    # the window's sums minus the excess of the few capped rows (O(k), not a pass over all)
    sw, swx, swy, swxx, swxy, swyy = win.moments(a)
    X, Y = win.X, win.Y
    for i in [i for i, x in enumerate(w) if x > c]:
        d = w[i] - c
        xi, yi = X[a + i], Y[a + i]
        sw -= d
        swx -= d * xi
        swy -= d * yi
        swxx -= d * xi * xi
        swxy -= d * xi * yi
        swyy -= d * yi * yi
    return _Capped(win.X[a:], win.s0, (sw, swx, swy, swxx, swxy, swyy))
