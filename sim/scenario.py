"""The drift-sim scenario: one frozen description of clock, load, network, tokens and strategies.

Every strategy of a run is built from the same ``Scenario`` and seed, so they face the same
oscillator (same wander draws), the same traffic and the same tokens. Defaults reproduce the
seed story (docs/SIMULATOR.md, "drift-sim"): an idle guest loses 1.0 s/day (-11.574 ppm), diurnal
traffic makes it lose ~10 % more, and with no sync the first JWT (leeway 3 s, 20 ms transit) is
rejected as "not yet valid" between day 2.5 and 3.5.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from sim.load import LoadProfile
from sim.oscillator import Oscillator
from sim.tokens import TokenConfig
from timesyncd.discipline import DisciplineConfig

_DC = DisciplineConfig()

FloatArray = npt.NDArray[np.float64]

DAY_S = 86_400.0
#: Calibration: an idle guest loses exactly 1.0 s per day.
IDLE_LOSS_PPM = -1e6 / DAY_S  # -11.574 ppm
STRATEGIES: tuple[str, ...] = ("none", "step", "discipline")


@dataclass(frozen=True)
class NetworkParams:
    """guest -> vsock -> relay -> upstream, one-way figures (seconds) per hop."""

    vsock_delay_s: float = field(default=50e-6, metadata={"help": "vsock one-way base delay"})
    vsock_jitter_s: float = field(default=20e-6, metadata={"help": "vsock exponential jitter mean"})
    vsock_queue_s: float = field(default=5e-3, metadata={
        "help": "extra vsock queueing mean at utilisation 1 (grows with load, exponential)"})
    upstream_delay_s: float = field(default=200e-6, metadata={
        "help": "relay <-> upstream one-way base delay"})
    upstream_jitter_s: float = field(default=50e-6, metadata={"help": "upstream jitter mean"})
    asymmetry_s: float = field(default=0.0, metadata={
        "help": "extra delay on the way out (guest->server) minus the way back"})
    loss: float = field(default=0.0, metadata={"help": "probability a request or reply is lost"})
    outages: tuple[tuple[float, float], ...] = field(default=(), metadata={
        "help": "relay down: (start_s, duration_s) windows"})
    host_load: str = field(default="", metadata={
        "help": "host CPU load profile (same syntax as load; empty: an idle host)"})
    relay_sched_s: float = field(default=0.0, metadata={
        "help": "mean wait per process wake-up on the path at host utilisation 1"})
    relay_kernel_stamps: bool = field(default=True, metadata={
        "help": "the relay stamps upstream replies in the kernel (False: the old relay)"})


@dataclass(frozen=True)
class Scenario:
    days: float = 7.0
    seed: int = 1
    load: str = "diurnal"
    strategies: tuple[str, ...] = STRATEGIES
    start_unix_s: int = 1_735_689_600  # 2025-01-01T00:00:00Z, a midnight: diurnal hours line up
    base_ppm: float = field(default=IDLE_LOSS_PPM, metadata={
        "help": "native rate error of the idle guest clock (loses 1.0 s/day)"})
    load_coupling_ppm: float = field(default=-2.5, metadata={
        "help": "extra rate error at utilisation 1 (busy guest loses more)"})
    wander_ppm_per_sqrt_s: float = field(default=2e-4, metadata={
        "help": "random-walk frequency wander, ppm per sqrt(second)"})
    read_noise_s: float = field(default=20e-9, metadata={"help": "clock read noise (std dev)"})
    initial_offset_s: float = 0.0
    upstream_error_s: float = field(default=0.0, metadata={
        "help": "upstream (and host) clock error, guest sees it as truth"})
    minpoll: int = field(default=_DC.minpoll, metadata={"help": "discipline: min poll, log2 s"})
    maxpoll: int = field(default=_DC.maxpoll, metadata={"help": "discipline: max poll, log2 s"})
    step_interval_s: float = field(default=300.0, metadata={
        "help": "step strategy: host time read over vsock this often"})
    sample_interval_s: float = field(default=60.0, metadata={
        "help": "offset series resolution for plots and CSV (max |offset| also counts every "
        "token check, frequency change and step)"})
    network: NetworkParams = NetworkParams()
    tokens: TokenConfig = TokenConfig()

    def __post_init__(self) -> None:
        if self.days <= 0:
            raise ValueError("days: must be > 0")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"strategies: unknown {s!r}; use {', '.join(STRATEGIES)}")
        if not 0 <= self.network.loss < 1:
            raise ValueError("loss: must be in [0, 1)")
        if self.minpoll > self.maxpoll:
            raise ValueError("minpoll: must not exceed maxpoll")

    @property
    def duration_s(self) -> float:
        return self.days * DAY_S

    @property
    def start_ns(self) -> int:
        return self.start_unix_s * 1_000_000_000

    def with_seed(self, seed: int) -> Scenario:
        return replace(self, seed=seed)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["network"]["outages"] = [list(o) for o in self.network.outages]
        d["tokens"]["kinds"] = list(self.tokens.kinds)
        d["strategies"] = list(self.strategies)
        return d


def parse_outage(text: str) -> tuple[float, float]:
    """``START:DURATION`` with units s/m/h/d (default seconds), e.g. ``2d:6h``."""
    start, sep, dur = text.partition(":")
    if not sep:
        raise ValueError(f"outage: {text!r} is not START:DURATION (e.g. 2d:6h)")
    return parse_duration(start), parse_duration(dur)


def parse_duration(text: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY_S}
    t = text.strip()
    mult = units.get(t[-1:], None)
    try:
        value = float(t[:-1]) * mult if mult is not None else float(t)
    except ValueError:
        raise ValueError(f"duration: {text!r} is not a number with optional s/m/h/d") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"duration: {text!r} must be a finite number >= 0")
    return value


MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    """``7``, ``1-10`` or ``1,3,5``."""
    seeds: list[int] = []
    for part in text.split(","):
        a, sep, b = part.partition("-")
        try:
            first, last = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"seeds: {text!r}; use N, A-B or a comma list") from None
        if last - first >= MAX_SEEDS:  # checked before the range is built
            raise ValueError(f"seeds: {text!r}; at most {MAX_SEEDS} seeds")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ValueError(f"seeds: {text!r} is empty; use N, A-B or a comma list")
    if len(seeds) > MAX_SEEDS or min(seeds) < 0 or max(seeds) >= 2**32:
        raise ValueError(f"seeds: {text!r}; at most {MAX_SEEDS} seeds, each 0..{2**32 - 1}")
    return seeds


class RateModel:
    """The guest oscillator of a run, shared by every strategy (same seed, same wander draws).

    ``ppm(t) = base + coupling * utilisation(t) + wander(t)``, built on the discipline
    engineer's ``sim.oscillator.Oscillator`` with the load coupling integrated exactly through
    the profile's interval means. The free-running offset is the oscillator's phase from 0.
    """

    def __init__(self, scenario: Scenario, load: LoadProfile) -> None:
        self.load = load
        k = scenario.load_coupling_ppm
        self.oscillator = Oscillator(
            base_ppm=scenario.base_ppm, wander_ppm_per_sqrt_s=scenario.wander_ppm_per_sqrt_s,
            rng=random.Random(f"oscillator/{scenario.seed}"), step_s=10.0,
            extra_ppm=lambda t: k * load(t), extra_mean_ppm=lambda a, b: k * load.mean(a, b))

    def ppm(self, true_s: float) -> float:
        return self.oscillator.ppm_at(true_s)

    def free_offset_s(self, times_s: FloatArray) -> FloatArray:
        """Time a free-running clock has gained (negative: lost) by each true time, seconds."""
        phase = self.oscillator.phase_s
        return np.array([phase(0.0, t) for t in np.asarray(times_s, dtype=np.float64).tolist()])
