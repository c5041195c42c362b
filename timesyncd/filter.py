"""Per-source sample store: spike rejection by delay, delay-aware weights, a fit window.

Samples are kept in the *uncorrected* time scale of the disciplined clock (see
``timesyncd.correction.CorrectionModel``): ``x`` is what the clock would read had we never
corrected it and ``y`` the offset of that uncorrected clock from the source. Slews and steps
do not change these values, so stored samples stay consistent without being rewritten.

Why delay matters: with a minimum round-trip delay ``d_min`` and a sample of delay ``d``,
the offset error lies within ``+-(d - d_min)/2``; the excess delay is the best noise
predictor we have, so it sets each sample's weight in the regression.

Plain Python on purpose (no numpy): the guest daemon must stay small, and windows hold at
most a few hundred samples. Prefix sums make each update's regression O(1).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from timesyncd.reasons import FilterReason

#: Floor of a sample's standard error, seconds: timestamping and read noise on the best path.
ERROR_FLOOR_S = 1e-6
#: Added to every excess delay over the floor: the floor itself is a sample, not the truth.
FLOOR_MARGIN_S = 10e-6
#: Delays of the last this many offered samples (kept or not) tell a spike from a new level:
#: when most of them exceed the spike allowance, the path itself got slower.
RECENT_DELAYS = 5


@dataclass(frozen=True, slots=True)
class FilteredSample:
    """One accepted measurement in uncorrected coordinates (seconds since the controller epoch)."""

    x: float  # uncorrected clock reading at the midpoint of the exchange
    y: float  # uncorrected clock minus source
    delay_s: float  # path delay (round trip minus relay residence)
    dispersion_s: float  # precision terms of both ends
    root_distance_s: float  # synchronisation distance to the source's reference
    leap: int = 0


def floor_weight(delay_s: float, dispersion_s: float, floor_s: float) -> tuple[float, float]:
    """(regression weight, error half-width) of a sample given the path's queue-free delay.

    Queueing only adds delay, so the offset error lies within half the excess over the floor
    (plus the dispersion); as noise it is about uniform: variance ``excess**2 / 12``.
    """
    # A delay below the floor (a clamped zero: the timestamps disagree) is no better than
    # one as far above it: |excess|, so such a sample cannot take the fit's whole weight.
    excess = abs(delay_s - floor_s) + FLOOR_MARGIN_S
    return (1.0 / (ERROR_FLOOR_S * ERROR_FLOOR_S + dispersion_s * dispersion_s
                   + excess * excess / 12.0), excess / 2 + dispersion_s)


def plain_weight(sample: FilteredSample) -> float:
    """Regression weight of a sample when nothing is known of the path floor (it may be
    zero): the offset error within half the whole delay, variance ``delay**2 / 12``."""
    return 1.0 / (ERROR_FLOOR_S * ERROR_FLOOR_S + sample.dispersion_s * sample.dispersion_s
                  + sample.delay_s * sample.delay_s / 12.0)


def _slope(rows: list[tuple[float, ...]]) -> float:
    """Weighted least-squares slope of (x, y, weight, _) rows (two passes: well conditioned)."""
    sw = math.fsum(r[2] for r in rows)
    if len(rows) < 2 or sw <= 0:
        return 0.0
    xm = math.fsum(r[2] * r[0] for r in rows) / sw
    ym = math.fsum(r[2] * r[1] for r in rows) / sw
    sxx = math.fsum(r[2] * (r[0] - xm) ** 2 for r in rows)
    sxy = math.fsum(r[2] * (r[0] - xm) * (r[1] - ym) for r in rows)
    return sxy / sxx if sxx > 0 else 0.0


class FitWindow:
    """Rows of a weighted line fit, with prefix sums so that any suffix regresses in O(1).

    Rows live in ``[lo, len(X))`` of the column lists. Coordinates are local and detrended:
    ``X = x - x0`` and ``Y = y - y0 - s0 * X``. Uncorrected time runs for days and the
    uncorrected offset drifts at the native rate (seconds per day), so raw moments would
    cancel catastrophically; near a line through the data they stay small. ``YLO``/``YHI``
    are ``Y`` minus/plus each sample's error half-width (for the bound intersection). ``q``
    is a second, floor-free weight per row (:func:`plain_weight`) with its own prefix sums,
    for the error bound's check of the fit (:meth:`plain_moments`).
    """

    __slots__ = ("x0", "y0", "s0", "x_max", "X", "Y", "w", "YLO", "YHI", "lo", "sorted_w",
                 "lo_order", "hi_order", "monotonic",
                 "pw", "pwx", "pwy", "pwxx", "pwxy", "pwyy", "pq", "pqx", "pqy", "pqxx", "pqxy")

    def __init__(self, rows: Iterable[tuple[float, ...]] = ()) -> None:
        self.reset(rows)

    def reset(self, rows: Iterable[tuple[float, ...]]) -> None:
        """Rebuild from (x, y, weight, half-width[, floor-free weight]) rows, oldest first,
        with a fresh origin."""
        rows = list(rows)
        self.x0 = rows[0][0] if rows else 0.0
        self.y0 = rows[0][1] if rows else 0.0
        self.s0 = _slope(rows)
        self.x_max = -float("inf")
        self.X: list[float] = []
        self.Y: list[float] = []
        self.w: list[float] = []
        self.YLO: list[float] = []
        self.YHI: list[float] = []
        self.lo = 0
        self.sorted_w: list[float] = []
        # rows by lower bound, highest first, and by upper bound, lowest first: (key, row)
        self.lo_order: list[tuple[float, int]] = []
        self.hi_order: list[tuple[float, int]] = []
        self.monotonic = True  # X never decreases (samples arrive in time order)
        self.pw = [0.0]
        self.pwx = [0.0]
        self.pwy = [0.0]
        self.pwxx = [0.0]
        self.pwxy = [0.0]
        self.pwyy = [0.0]
        self.pq = [0.0]
        self.pqx = [0.0]
        self.pqy = [0.0]
        self.pqxx = [0.0]
        self.pqxy = [0.0]
        for row in rows:
            self.append(*row)

    def __len__(self) -> int:
        return len(self.X) - self.lo

    def append(self, x: float, y: float, w: float, half: float, q: float = 0.0) -> None:
        X = x - self.x0
        Y = y - self.y0 - self.s0 * X
        row = len(self.X)
        if self.X and X < self.X[-1]:
            self.monotonic = False
        self.X.append(X)
        self.Y.append(Y)
        self.w.append(w)
        self.YLO.append(Y - half)
        self.YHI.append(Y + half)
        if X > self.x_max:
            self.x_max = X
        insort(self.sorted_w, w)
        insort(self.lo_order, (half - Y, row))
        insort(self.hi_order, (Y + half, row))
        wx = w * X
        wy = w * Y
        self.pw.append(self.pw[-1] + w)
        self.pwx.append(self.pwx[-1] + wx)
        self.pwy.append(self.pwy[-1] + wy)
        self.pwxx.append(self.pwxx[-1] + wx * X)
        self.pwxy.append(self.pwxy[-1] + wx * Y)
        self.pwyy.append(self.pwyy[-1] + wy * Y)
        qx = q * X
        self.pq.append(self.pq[-1] + q)
        self.pqx.append(self.pqx[-1] + qx)
        self.pqy.append(self.pqy[-1] + q * Y)
        self.pqxx.append(self.pqxx[-1] + qx * X)
        self.pqxy.append(self.pqxy[-1] + qx * Y)

    def drop_front(self, k: int) -> None:
        """Forget the ``k`` oldest rows (their prefix sums stay; only ``lo`` moves)."""
        end = min(self.lo + max(k, 0), len(self.X))
        sw = self.sorted_w
        lo_order, hi_order = self.lo_order, self.hi_order
        for i in range(self.lo, end):
            del sw[bisect_left(sw, self.w[i])]
            del lo_order[bisect_left(lo_order, (-self.YLO[i], i))]
            del hi_order[bisect_left(hi_order, (self.YHI[i], i))]
        self.lo = end

    def moments(self, a: int) -> tuple[float, float, float, float, float, float]:
        """Weighted sums (w, wX, wY, wXX, wXY, wYY) over rows ``[a, len(X))`` (absolute a)."""
        return (self.pw[-1] - self.pw[a], self.pwx[-1] - self.pwx[a],
                self.pwy[-1] - self.pwy[a], self.pwxx[-1] - self.pwxx[a],
                self.pwxy[-1] - self.pwxy[a], self.pwyy[-1] - self.pwyy[a])

    def plain_moments(self, a: int) -> tuple[float, float, float, float, float]:
        """Sums (q, qX, qY, qXX, qXY) of the floor-free weights over rows ``[a, len(X))``."""
        return (self.pq[-1] - self.pq[a], self.pqx[-1] - self.pqx[a],
                self.pqy[-1] - self.pqy[a], self.pqxx[-1] - self.pqxx[a],
                self.pqxy[-1] - self.pqxy[a])


class SampleFilter:
    """Keeps the recent samples of one source and rejects delay spikes.

    A sample is a spike when its delay exceeds the recent minimum by more than
    ``max_delay_dev_ratio`` times the median excess delay (chrony's ``maxdelaydevratio``
    idea), so queueing bursts do not pull the estimate while ordinary jitter is weighted.
    A spike is a short burst, though: once most of the last ``RECENT_DELAYS`` offered
    samples exceed the allowance, the path's delay has shifted (host load, a slower route)
    and samples are kept again, weighted by their excess delay; rejecting them all would
    starve the source for as long as the shift lasts. The samples' weights follow the
    path's delay floor (smallest delay over ``floor_span_s``); ``window`` holds them ready
    for the regression.
    """

    def __init__(self, max_samples: int = 64, max_delay_dev_ratio: float = 10.0,
                 floor_span_s: float = 86_400.0) -> None:
        self.max_samples = max_samples
        self.max_delay_dev_ratio = max_delay_dev_ratio
        self.floor_span_s = floor_span_s
        # minimum delay per time bucket (bucket start x, min delay), oldest first
        self._floor: deque[tuple[float, float]] = deque()
        self._floor_s: float | None = None
        self._samples: deque[FilteredSample] = deque()
        self._sorted_delays: list[float] = []
        self._recent: deque[float] = deque(maxlen=RECENT_DELAYS)
        self.window = FitWindow()
        #: samples stored since the last clear (the window may have pruned most of them,
        #: but the path floor learnt from them stands)
        self.seen = 0

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[FilteredSample]:
        return iter(self._samples)

    @property
    def samples(self) -> list[FilteredSample]:
        return list(self._samples)

    def min_delay(self) -> float | None:
        return self._sorted_delays[0] if self._sorted_delays else None

    def _above_allowance(self, delay_s: float) -> bool:
        delays = self._sorted_delays
        if len(delays) < 4 or self.max_delay_dev_ratio <= 0:
            return False
        excess = delays[len(delays) // 2] - delays[0]
        allowance = max(excess, 5 * ERROR_FLOOR_S) * self.max_delay_dev_ratio
        return delay_s - delays[0] > allowance

    def is_spike(self, delay_s: float) -> bool:
        """Whether a sample with this delay, offered next, would be rejected as a spike."""
        if not self._above_allowance(delay_s):
            return False
        recent = [*list(self._recent)[1 - RECENT_DELAYS:], delay_s]  # the last RECENT_DELAYS
        high = sum(1 for d in recent if self._above_allowance(d))
        return 2 * high <= RECENT_DELAYS  # a level shift once most recent ones are high

    def add(self, sample: FilteredSample) -> str | None:
        """Store ``sample``; return a rejection reason (``"delay_spike"``) instead if it is one."""
        spike = self.is_spike(sample.delay_s)
        self._recent.append(sample.delay_s)
        if spike:
            return FilterReason.DELAY_SPIKE
        if len(self._samples) >= self.max_samples:
            self._drop_oldest(len(self._samples) - self.max_samples + 1)
        self._samples.append(sample)
        self.seen += 1
        insort(self._sorted_delays, sample.delay_s)
        self._note_delay(sample.x, sample.delay_s)
        floor = self.delay_floor()
        assert floor is not None
        win = self.window
        if floor != self._floor_s or len(win.X) >= 2 * self.max_samples:
            self._floor_s = floor
            self._rebuild()
        else:
            w, half = floor_weight(sample.delay_s, sample.dispersion_s, floor)
            win.append(sample.x, sample.y, w, half, plain_weight(sample))
        return None

    def _rebuild(self) -> None:
        """Weights for the current floor and a fresh origin for the window."""
        floor = self._floor_s if self._floor_s is not None else 0.0
        self.window.reset((s.x, s.y, *floor_weight(s.delay_s, s.dispersion_s, floor),
                           plain_weight(s)) for s in self._samples)

    def _drop_oldest(self, k: int) -> None:
        delays = self._sorted_delays
        for _ in range(min(k, len(self._samples))):
            s = self._samples.popleft()
            del delays[bisect_left(delays, s.delay_s)]
        self.window.drop_front(len(self.window) - len(self._samples))

    def _note_delay(self, x: float, delay: float) -> None:
        floor = self._floor
        if delay <= 0.0 and floor:
            return  # clamped to zero (timestamps disagree): not the path's real floor
        bucket = self.floor_span_s / 8
        if floor and x < floor[-1][0] + bucket:
            if delay < floor[-1][1]:
                floor[-1] = (floor[-1][0], delay)
        else:
            floor.append((x, delay))
        while floor and floor[0][0] < x - self.floor_span_s:
            floor.popleft()

    def delay_floor(self) -> float | None:
        """Smallest delay seen over the last ``floor_span_s``: the path's queue-free delay."""
        return min((d for _, d in self._floor), default=None)

    def columns(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """Columns (x, y, delay, dispersion) of the stored samples, oldest first."""
        s = self._samples
        return ([p.x for p in s], [p.y for p in s], [p.delay_s for p in s],
                [p.dispersion_s for p in s])

    def prune(self, keep: int) -> None:
        """Drop all but the newest ``keep`` samples (the regression found older ones stale)."""
        self._drop_oldest(len(self._samples) - max(keep, 0))

    def clear(self) -> None:
        self.seen = 0
        self._samples.clear()
        self._sorted_delays.clear()
        self._recent.clear()
        self._floor.clear()
        self._floor_s = None
        self.window.reset(())

    def best_distance(self, x_now: float, phi: float, last: int = 8) -> float:
        """Smallest root distance among the ``last`` stored samples, each grown at ``phi``
        (frequency tolerance) for its age: the error bound of the best recent measurement,
        as NTP's clock filter takes it (its minimum-delay sample). The newest sample alone
        would let one slow exchange, kept at a raised delay level, widen the bound tenfold.
        Infinite with no samples: nothing bounds the error."""
        return min((s.root_distance_s + phi * max(x_now - s.x, 0.0)
                    for s in itertools.islice(reversed(self._samples), last)),
                   default=math.inf)

    def latest(self) -> FilteredSample | None:
        return self._samples[-1] if self._samples else None


def sample_variance(sample: FilteredSample, min_delay_s: float) -> float:
    """Variance of a sample's offset error given the window's minimum delay.

    Given the excess delay ``e`` split randomly between the two directions, the offset
    error is about uniform on ``[-e/2, e/2]``: variance ``e**2 / 12``.
    """
    excess = max(sample.delay_s - min_delay_s, 0.0)
    return ERROR_FLOOR_S**2 + sample.dispersion_s**2 + excess * excess / 12.0
