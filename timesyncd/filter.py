"""Per-source sample store: spike rejection by delay and delay-aware weights.

Samples are kept in the *uncorrected* time scale of the disciplined clock (see
``timesyncd.discipline.CorrectionModel``): ``x`` is what the clock would read had we never
corrected it and ``y`` the offset of that uncorrected clock from the source. Slews and steps
do not change these values, so stored samples stay consistent without being rewritten.

Why delay matters: with a minimum round-trip delay ``d_min`` and a sample of delay ``d``,
the offset error lies within ``+-(d - d_min)/2``; the excess delay is the best noise
predictor we have, so it sets each sample's weight in the regression.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Floor of a sample's standard error, seconds: timestamping and read noise on the best path.
ERROR_FLOOR_S = 1e-6


@dataclass(frozen=True, slots=True)
class FilteredSample:
    """One accepted measurement in uncorrected coordinates (seconds since the controller epoch)."""

    x: float  # uncorrected clock reading at the midpoint of the exchange
    y: float  # uncorrected clock minus source
    delay_s: float  # path delay (round trip minus relay residence)
    dispersion_s: float  # precision terms of both ends
    root_distance_s: float  # synchronisation distance to the source's reference
    leap: int = 0


class SampleFilter:
    """Keeps the recent samples of one source and rejects delay spikes.

    A sample is a spike when its delay exceeds the recent minimum by more than
    ``max_delay_dev_ratio`` times the median excess delay (chrony's ``maxdelaydevratio``
    idea), so queueing bursts do not pull the estimate while ordinary jitter is weighted.
    """

    def __init__(self, max_samples: int = 64, max_delay_dev_ratio: float = 10.0,
                 floor_span_s: float = 86_400.0) -> None:
        self.max_samples = max_samples
        self.max_delay_dev_ratio = max_delay_dev_ratio
        self.floor_span_s = floor_span_s
        # minimum delay per time bucket (bucket start x, min delay), oldest first
        self._floor: deque[tuple[float, float]] = deque()
        self._samples: deque[FilteredSample] = deque(maxlen=max_samples)
        # columns x, y, delay, dispersion in a buffer of twice the window: rows [lo, hi)
        self._buf = np.zeros((4, 2 * max_samples))
        self._lo = self._hi = 0

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[FilteredSample]:
        return iter(self._samples)

    @property
    def samples(self) -> list[FilteredSample]:
        return list(self._samples)

    def min_delay(self) -> float | None:
        return min((s.delay_s for s in self._samples), default=None)

    def is_spike(self, delay_s: float) -> bool:
        """Whether a sample with this delay would be rejected as a delay spike."""
        if len(self._samples) < 4 or self.max_delay_dev_ratio <= 0:
            return False
        delays = self.arrays()[2]
        d_min = float(delays.min())
        k = len(delays) // 2
        excess = float(np.partition(delays, k)[k]) - d_min
        allowance = max(excess, 5 * ERROR_FLOOR_S) * self.max_delay_dev_ratio
        return delay_s - d_min > allowance

    def add(self, sample: FilteredSample) -> str | None:
        """Store ``sample``; return a rejection reason (``"delay_spike"``) instead if it is one."""
        if self.is_spike(sample.delay_s):
            return "delay_spike"
        self._samples.append(sample)
        self._note_delay(sample.x, sample.delay_s)
        buf = self._buf
        if self._hi == buf.shape[1]:  # compact: keep the newest rows at the front
            keep = self._hi - self._lo
            buf[:, :keep] = buf[:, self._lo:self._hi]
            self._lo, self._hi = 0, keep
        buf[:, self._hi] = (sample.x, sample.y, sample.delay_s, sample.dispersion_s)
        self._hi += 1
        self._lo = self._hi - len(self._samples)
        return None

    def _note_delay(self, x: float, delay: float) -> None:
        floor = self._floor
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

    def arrays(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Columns (x, y, delay, dispersion) of the stored samples, oldest first (views)."""
        view = self._buf[:, self._lo:self._hi]
        return view[0], view[1], view[2], view[3]

    def prune(self, keep: int) -> None:
        """Drop all but the newest ``keep`` samples (the regression found older ones stale)."""
        while len(self._samples) > max(keep, 0):
            self._samples.popleft()
        self._lo = self._hi - len(self._samples)

    def clear(self) -> None:
        self._samples.clear()
        self._floor.clear()
        self._lo = self._hi = 0

    def latest(self) -> FilteredSample | None:
        return self._samples[-1] if self._samples else None


def sample_variance(sample: FilteredSample, min_delay_s: float) -> float:
    """Variance of a sample's offset error given the window's minimum delay.

    Given the excess delay ``e`` split randomly between the two directions, the offset
    error is about uniform on ``[-e/2, e/2]``: variance ``e**2 / 12``.
    """
    excess = max(sample.delay_s - min_delay_s, 0.0)
    return ERROR_FLOOR_S**2 + sample.dispersion_s**2 + excess * excess / 12.0
