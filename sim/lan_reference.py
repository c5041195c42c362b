"""chrony's own simulation-test model, used to tune and check the discipline.

Model: native frequency error 100 ppm plus a random walk of 1e-9 per sqrt-second, each
one-way delay 100 us + exponential jitter (mean 100 us), initial offset +0.1 s, fixed 16 s
poll (minpoll = maxpoll = 4), 20,000 s. The clock's true offset is sampled every true
second; statistics cover 2,000-20,000 s. ``converged_after_s`` is the first time from which
|offset| stays below 1 ms. ``rms_freq_error_ppm`` compares the controller's estimate of the
native frequency error with the oscillator's actual one.

Targets (seeds 1-10): median RMS <= 11 us, worst max <= 120 us, converged within 60 s.
Run ``python -m sim.lan_reference 1-10`` for a table.

Other poll intervals (``minpoll``/``maxpoll``, fixed when equal) run longer: at least
:data:`MIN_POLLS` polls of ``2**maxpoll`` after the statistics start, as chrony's own tests
do for long polls. Beside the controller's figures each run reports those of
:mod:`sim.reference_estimator` on the same exchanges (``ref_rms_offset_s``...).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from dataclasses import asdict, dataclass, replace

import numpy as np

from guest_client.controller import GuestController
from sim.clock import SimClock
from sim.engine import Engine, Upstream
from sim.network import Hop
from sim.oscillator import Oscillator
from sim.reference_estimator import RecordingNetwork, reference
from timesyncd.discipline import DisciplineConfig

START_UNIX_NS = 1_735_689_600 * 1_000_000_000
CONFIG = DisciplineConfig(minpoll=4, maxpoll=4, burst=0)
#: Statistics cover at least this many of the longest polls.
MIN_POLLS = 150
BASE_DURATION_S = 20_000.0
STATS_FROM_S = 2_000.0
WANDER_PPM_PER_SQRT_S = 1e-3



@dataclass(frozen=True)
class Path:
    """One-way delay of the path: ``base_s`` plus exponential jitter of mean ``jitter_s``."""

    base_s: float
    jitter_s: float


LAN_PATH = Path(100e-6, 100e-6)
#: The noisy path the issue measured chrony on (``--scenario lan-noisy``).
NOISY_PATH = Path(500e-6, 2e-3)


def duration_for(maxpoll: int, stats_from_s: float = STATS_FROM_S) -> float:
    """Run length for a poll: 20,000 s, or :data:`MIN_POLLS` polls after ``stats_from_s``."""
    return max(BASE_DURATION_S, stats_from_s + MIN_POLLS * 2.0 ** maxpoll)


@dataclass(frozen=True)
class LanResult:
    seed: int
    rms_offset_s: float
    max_abs_offset_s: float
    rms_freq_error_ppm: float
    converged_after_s: float | None
    steps: int
    bound_coverage: float = 1.0  # share of samples (whole run) with |offset| <= error bound
    max_true_over_bound: float = 0.0
    median_bound_s: float = 0.0
    max_freq_error_ppm: float = 0.0  # after stats_from_s
    median_rtt_s: float = 0.0
    ref_rms_offset_s: float = 0.0  # the model-aware reference estimator, same exchanges
    ref_max_abs_offset_s: float = 0.0
    minpoll: int = 4
    maxpoll: int = 4
    duration_s: float = BASE_DURATION_S
    packets_sent: int = 0


def run(seed: int, *, duration_s: float | None = None, stats_from_s: float = STATS_FROM_S,
        config: DisciplineConfig = CONFIG, minpoll: int | None = None,
        maxpoll: int | None = None, path: Path = LAN_PATH) -> LanResult:
    """One seeded run of the model; deterministic for a seed.

    ``minpoll``/``maxpoll`` override ``config``'s; ``duration_s`` defaults to
    :func:`duration_for` the longest poll."""
    if minpoll is not None or maxpoll is not None:
        config = replace(config, minpoll=config.minpoll if minpoll is None else minpoll,
                         maxpoll=config.maxpoll if maxpoll is None else maxpoll)
    if duration_s is None:
        duration_s = duration_for(config.maxpoll, stats_from_s)
    rng = random.Random(seed)
    osc = Oscillator(100.0, WANDER_PPM_PER_SQRT_S, random.Random(rng.getrandbits(64)))
    clock = SimClock(osc, start_unix_ns=START_UNIX_NS, initial_offset_s=0.1)
    hop = Hop(base_s=path.base_s, jitter_s=path.jitter_s)
    net = RecordingNetwork(upstream=hop, floor_rtt_s=2 * path.base_s)
    upstream = Upstream("lan", net)
    controller = GuestController(config, random.Random(rng.getrandbits(64)))
    offsets: list[tuple[float, float]] = []
    freq_err: list[float] = []
    ratios: list[float] = []
    bounds: list[float] = []

    def sample(engine: Engine) -> None:
        t = engine.now_s
        offsets.append((t, clock.offset_s()))
        bound = controller.error_bound(clock.reading_ns())
        ratios.append(abs(clock.offset_s()) / bound.bound_s)
        if bound.estimate_s is not None:
            bounds.append(bound.bound_s)
        if t >= stats_from_s:
            freq_err.append(controller.frequency_ppm - osc.ppm_at(t))

    engine = Engine(controller, clock, [upstream], random.Random(rng.getrandbits(64)),
                    sample_every_s=1.0, on_sample=sample)
    engine.run(duration_s)
    window = [abs(o) for t, o in offsets if t >= stats_from_s]
    converged: float | None = None
    for t, o in reversed(offsets):
        if abs(o) >= 1e-3:
            break
        converged = t
    times = np.array([t for t, _ in offsets if t >= stats_from_s])
    ref = reference(net.exchanges, WANDER_PPM_PER_SQRT_S * 1e-6,
                    lambda t: 0.1 + osc.phase_to_array(t), times)
    return LanResult(
        seed=seed,
        rms_offset_s=math.sqrt(sum(o * o for o in window) / len(window)),
        max_abs_offset_s=max(window),
        rms_freq_error_ppm=math.sqrt(sum(f * f for f in freq_err) / len(freq_err)),
        converged_after_s=converged,
        steps=len(clock.steps),
        bound_coverage=sum(1 for r in ratios if r <= 1.0) / len(ratios),
        max_true_over_bound=max(ratios),
        median_bound_s=statistics.median(bounds),
        max_freq_error_ppm=max(abs(f) for f in freq_err),
        median_rtt_s=statistics.median(engine.round_trips_s),
        ref_rms_offset_s=ref.rms_offset_s,
        ref_max_abs_offset_s=ref.max_abs_offset_s,
        minpoll=config.minpoll,
        maxpoll=config.maxpoll,
        duration_s=duration_s,
        packets_sent=engine.packets_sent,
    )


def summary(results: list[LanResult]) -> dict[str, float | None]:
    conv = [r.converged_after_s for r in results]
    return {
        "median_rms_offset_s": statistics.median(r.rms_offset_s for r in results),
        "worst_max_abs_offset_s": max(r.max_abs_offset_s for r in results),
        "worst_converged_after_s": None if None in conv else max(c for c in conv if c is not None),
        "p95_max_abs_offset_s": float(np.percentile([r.max_abs_offset_s for r in results], 95)),
        "ref_median_rms_offset_s": statistics.median(r.ref_rms_offset_s for r in results),
        "min_bound_coverage": min(r.bound_coverage for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="?", default="1-10", help="N, A-B or a comma list")
    parser.add_argument("--minpoll", type=int, default=CONFIG.minpoll)
    parser.add_argument("--maxpoll", type=int, default=CONFIG.maxpoll)
    args = parser.parse_args()
    seeds: list[int] = []
    for part in args.seeds.split(","):
        a, _, b = part.partition("-")
        seeds.extend(range(int(a), int(b or a) + 1))
    results = []
    print(f"{'seed':>4} {'rms_us':>8} {'max_us':>8} {'freq_ppm':>9} {'conv_s':>7} "
          f"{'ref_rms':>8}")
    for seed in seeds:
        r = run(seed, minpoll=args.minpoll, maxpoll=args.maxpoll)
        results.append(r)
        print(f"{r.seed:>4} {r.rms_offset_s * 1e6:8.2f} {r.max_abs_offset_s * 1e6:8.1f} "
              f"{r.rms_freq_error_ppm:9.4f} {r.converged_after_s!s:>7} "
              f"{r.ref_rms_offset_s * 1e6:8.2f}", flush=True)
    print(summary(results))


__all__ = ["LanResult", "run", "summary", "asdict", "replace"]

if __name__ == "__main__":
    main()
