"""Guest traffic profiles: requests per second over true virtual time.

Load matters twice in the simulator: it couples into the guest oscillator (a busy enclave's
kvm-clock loses more time: ``coupling_ppm * utilisation``) and it queues the vsock hop (in-enclave
networking is many times slower under load). Both consume the *utilisation*, requests per second
divided by ``full_scale_rps``; the clock and network models take plain callables
``load(true_s) -> utilisation`` so any profile (or a lambda) plugs in.

Every profile also gives the exact mean over an interval (:meth:`LoadProfile.mean`) so an
oscillator can integrate the coupling term analytically instead of sampling it.

CSV trace format (``--load PATH.csv``): a header line ``time_s,requests_per_second`` then rows of
seconds from the start of the run (ascending, first row at 0) and the request rate from that
time until the next row (a step function). Lines starting with ``#`` are ignored. After the last
row the trace repeats from 0 with period ``last time + (last - previous)`` when ``repeat`` is set,
otherwise the last rate holds.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

DAY_S = 86_400.0
FloatArray = npt.NDArray[np.float64]

#: Requests per second that count as utilisation 1.0 (the diurnal peak, by default).
DEFAULT_FULL_SCALE_RPS = 1000.0


class LoadProfile(ABC):
    """A traffic profile in requests per second; utilisation is rps / full_scale_rps."""

    full_scale_rps: float = DEFAULT_FULL_SCALE_RPS

    @abstractmethod
    def rps(self, true_s: float) -> float:
        """Requests per second at ``true_s`` seconds from the start of the run."""

    @abstractmethod
    def mean_rps(self, t0: float, t1: float) -> float:
        """Exact mean of :meth:`rps` over ``[t0, t1]`` (``rps(t0)`` when ``t1 <= t0``)."""

    def utilisation(self, true_s: float) -> float:
        return self.rps(true_s) / self.full_scale_rps

    def __call__(self, true_s: float) -> float:
        """The ``load(true_s)`` callable the clock and network models take: utilisation."""
        return self.rps(true_s) / self.full_scale_rps

    def mean(self, t0: float, t1: float) -> float:
        """Mean utilisation over ``[t0, t1]``, for analytic integration of load coupling."""
        return self.mean_rps(t0, t1) / self.full_scale_rps

    def mean_from_zero(self, t1: FloatArray) -> FloatArray:
        """``mean(0, t)`` for each element of ``t1``, bit for bit (vectorised where the profile
        knows how: the simulator evaluates the guest clock at ~10^5 instants at once)."""
        t = np.asarray(t1, dtype=np.float64)
        return self._mean_rps_from_zero(t) / self.full_scale_rps

    def _mean_rps_from_zero(self, t: FloatArray) -> FloatArray:
        f = self.mean_rps
        return np.fromiter((f(0.0, x) for x in t.tolist()), np.float64, len(t))


@dataclass(frozen=True)
class ConstantLoad(LoadProfile):
    """A steady rate; ``ConstantLoad(0)`` is the idle guest used for calibration."""

    value_rps: float = 0.0
    full_scale_rps: float = DEFAULT_FULL_SCALE_RPS

    def rps(self, true_s: float) -> float:
        return self.value_rps

    def mean_rps(self, t0: float, t1: float) -> float:
        return self.value_rps

    def _mean_rps_from_zero(self, t: FloatArray) -> FloatArray:
        return np.full(len(t), self.value_rps, dtype=np.float64)


@dataclass(frozen=True)
class DiurnalLoad(LoadProfile):
    """Daily sinusoid: ``mean + amplitude * cos(2 pi (t - peak) / day)``, never below zero.

    Defaults: 500 rps mean, 400 rps swing, peak at 14:00 into each simulated day, i.e. utilisation
    0.1 at night to 0.9 in the afternoon.
    """

    mean_value_rps: float = 500.0
    amplitude_rps: float = 400.0
    peak_hour: float = 14.0
    full_scale_rps: float = DEFAULT_FULL_SCALE_RPS

    def __post_init__(self) -> None:
        if self.amplitude_rps > self.mean_value_rps:
            raise ValueError("diurnal load: amplitude must not exceed the mean (no negative load)")

    def _phase(self, true_s: float) -> float:
        return 2.0 * math.pi * (true_s / DAY_S - self.peak_hour / 24.0)

    def rps(self, true_s: float) -> float:
        return self.mean_value_rps + self.amplitude_rps * math.cos(self._phase(true_s))

    def mean_rps(self, t0: float, t1: float) -> float:
        if t1 <= t0:
            return self.rps(t0)
        w = 2.0 * math.pi / DAY_S
        integral = (math.sin(self._phase(t1)) - math.sin(self._phase(t0))) / w
        return self.mean_value_rps + self.amplitude_rps * integral / (t1 - t0)

    def _mean_rps_from_zero(self, t: FloatArray) -> FloatArray:
        # same operations as mean_rps(0, t); math.sin, not np.sin, whose last bit may differ
        phase = 2.0 * math.pi * (t / DAY_S - self.peak_hour / 24.0)
        sin1 = np.fromiter(map(math.sin, phase.tolist()), np.float64, len(t))
        integral = (sin1 - math.sin(self._phase(0.0))) / (2.0 * math.pi / DAY_S)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.mean_value_rps + self.amplitude_rps * integral / t
        return np.where(t <= 0.0, self.rps(0.0), out)


@dataclass(frozen=True)
class _Steps:
    """A right-continuous step function with exact interval means (shared by trace and bursts)."""

    times: tuple[float, ...]
    values: tuple[float, ...]
    period: float | None = None  # repeat with this period; None: last value holds
    _cum: tuple[float, ...] = field(default=(), repr=False)

    @staticmethod
    def build(times: list[float], values: list[float], period: float | None) -> _Steps:
        if not times or times[0] != 0.0:
            raise ValueError("load trace must start at time 0")
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError("load trace times must be strictly ascending")
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError("load trace rates must be finite and >= 0")
        cum = [0.0]
        for i in range(1, len(times)):
            cum.append(cum[-1] + values[i - 1] * (times[i] - times[i - 1]))
        return _Steps(tuple(times), tuple(values), period, tuple(cum))

    def value(self, t: float) -> float:
        if self.period is not None:
            t = t % self.period
        i = bisect.bisect_right(self.times, t) - 1
        return self.values[max(i, 0)]

    def _integral(self, t: float) -> float:
        """Integral from 0 to t (t >= 0)."""
        whole = 0.0
        if self.period is not None:
            n, t = divmod(t, self.period)
            whole = n * self._integral_one(self.period)
        return whole + self._integral_one(t)

    def _integral_one(self, t: float) -> float:
        i = max(bisect.bisect_right(self.times, t) - 1, 0)
        return self._cum[i] + self.values[i] * (t - self.times[i])

    def mean(self, t0: float, t1: float) -> float:
        if t1 <= t0:
            return self.value(t0)
        return (self._integral(t1) - self._integral(t0)) / (t1 - t0)

    def _integral_one_array(self, t: FloatArray) -> FloatArray:
        times = np.array(self.times)
        i = np.maximum(np.searchsorted(times, t, side="right") - 1, 0)
        return np.array(self._cum)[i] + np.array(self.values)[i] * (t - times[i])

    def mean_from_zero(self, t: FloatArray) -> FloatArray:
        """``mean(0, t)`` element-wise, bit for bit."""
        whole: FloatArray | float = 0.0
        rest = t
        if self.period is not None:
            n, rest = np.divmod(t, self.period)
            whole = n * self._integral_one(self.period)
        total = whole + self._integral_one_array(rest)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (total - self._integral(0.0)) / t
        return np.where(t <= 0.0, self.value(0.0), out)


@dataclass(frozen=True)
class StepLoad(LoadProfile):
    """A load that is a step function of time (a recorded trace, or generated bursts)."""

    steps: _Steps

    def rps(self, true_s: float) -> float:
        return self.steps.value(true_s)

    def mean_rps(self, t0: float, t1: float) -> float:
        return self.steps.mean(t0, t1)

    def _mean_rps_from_zero(self, t: FloatArray) -> FloatArray:
        return self.steps.mean_from_zero(t)


@dataclass(frozen=True)
class TraceLoad(StepLoad):
    """A recorded trace of requests per second (see the module docstring for the CSV format)."""

    full_scale_rps: float = DEFAULT_FULL_SCALE_RPS
    source: str = ""

    @classmethod
    def from_rows(cls, rows: list[tuple[float, float]], *, repeat: bool = False,
                  full_scale_rps: float = DEFAULT_FULL_SCALE_RPS, source: str = "") -> TraceLoad:
        times = [float(t) for t, _ in rows]
        values = [float(v) for _, v in rows]
        period = None
        if repeat:
            if len(times) < 2:
                raise ValueError("a repeating load trace needs at least two rows")
            period = times[-1] + (times[-1] - times[-2])
        return cls(_Steps.build(times, values, period), full_scale_rps, source)

    @classmethod
    def from_csv(cls, path: str | Path, *, repeat: bool = False,
                 full_scale_rps: float = DEFAULT_FULL_SCALE_RPS) -> TraceLoad:
        rows: list[tuple[float, float]] = []
        with open(path, newline="", encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.reader(lines)
        for lineno, row in enumerate(reader, start=1):
            if lineno == 1 and row and not _is_number(row[0]):
                continue  # header
            if len(row) < 2:
                raise ValueError(f"{path}: row {lineno}: expected time_s,requests_per_second")
            try:
                t, rps = float(row[0]), _rate(row[1], f"{path}: row {lineno}")
            except ValueError:
                raise ValueError(f"{path}: row {lineno}: not a time and a finite rate >= 0: "
                                 f"{row!r}") from None
            if not math.isfinite(t):
                raise ValueError(f"{path}: row {lineno}: time {row[0]!r} is not finite")
            rows.append((t, rps))
        return cls.from_rows(rows, repeat=repeat, full_scale_rps=full_scale_rps, source=str(path))


@dataclass(frozen=True)
class BurstyLoad(StepLoad):
    """A quiet baseline with seeded random bursts (exponential gaps and lengths).

    The bursts are drawn once at construction for ``horizon_s``, so the profile is a plain
    deterministic function of time afterwards (the same for every strategy of a run).
    """

    full_scale_rps: float = DEFAULT_FULL_SCALE_RPS

    @classmethod
    def generate(cls, seed: int, horizon_s: float, *, base_rps: float = 100.0,
                 burst_rps: float = 1000.0, mean_gap_s: float = 3600.0,
                 mean_burst_s: float = 600.0,
                 full_scale_rps: float = DEFAULT_FULL_SCALE_RPS) -> BurstyLoad:
        rng = random.Random(f"bursty-load/{seed}")
        times, values = [0.0], [base_rps]
        t = 0.0
        while True:
            t += rng.expovariate(1.0 / mean_gap_s)
            if t >= horizon_s:
                break
            times.append(t)
            values.append(burst_rps)
            t += rng.expovariate(1.0 / mean_burst_s)
            times.append(t)
            values.append(base_rps)
        return cls(_Steps.build(times, values, None), full_scale_rps)


def _rate(text: str, where: str) -> float:
    """A request rate: a finite number >= 0 (NaN would poison every mean it enters)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"load: {where}: rate {text!r} is not a finite number >= 0")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def make_load(spec: str, *, seed: int, horizon_s: float) -> LoadProfile:
    """``constant`` (idle), ``constant:RPS``, ``diurnal``, ``bursty`` or a path to a CSV trace."""
    name, _, arg = spec.partition(":")
    if name == "constant":
        rps = _rate(arg, spec) if arg else 0.0
        return ConstantLoad(rps)
    if name == "diurnal":
        return DiurnalLoad()
    if name == "bursty":
        return BurstyLoad.generate(seed, horizon_s)
    if spec.endswith(".csv") or Path(spec).is_file():
        return TraceLoad.from_csv(spec)
    raise ValueError(f"load: unknown profile {spec!r}; use constant[:RPS], diurnal, bursty or "
                     "a PATH.csv trace")
