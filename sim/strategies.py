"""The three ways a guest can keep time, run on the same seeded clock, load, network and tokens.

* ``none``: free-running; the offset is the exact integral of the rate error.
* ``step``: what existing enclave toolkits do: every ``step_interval_s`` read the host's wall
  time over vsock and ``clock_settime`` it, ignoring the round trip. The clock lands behind by
  the return-path delay, which varies with vsock queueing, so it jumps both ways.
* ``discipline``: the real ``guest_client.controller.GuestController`` driven in virtual time by
  the discipline engineer's ``sim.engine`` with a ``SimClock``.

Each function returns the guest offset (guest minus true, seconds) at the requested sorted true
instants, plus the clock jumps it made.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sim.load import LoadProfile
from sim.scenario import RateModel, Scenario

if TYPE_CHECKING:
    from sim.engine import Engine

FloatArray = npt.NDArray[np.float64]

#: Called with the fraction of a strategy's virtual time simulated so far (0..1].
Fraction = Callable[[float], None]
PROGRESS_CHUNKS = 50


@dataclass
class SimInputs:
    """What every strategy of one run shares."""

    scenario: Scenario
    load: LoadProfile
    rate: RateModel


@dataclass
class Trajectory:
    offsets_s: FloatArray  # at the requested instants
    jumps_s: FloatArray = field(default_factory=lambda: np.zeros(0))  # signed, in order
    jump_times_s: FloatArray = field(default_factory=lambda: np.zeros(0))
    offsets_at_jumps_before_s: FloatArray = field(default_factory=lambda: np.zeros(0))
    extra: dict[str, Any] = field(default_factory=dict)
    engine: Engine | None = None  # discipline: the engine that drove the controller
    # offsets at the trajectory's own breakpoints (discipline: every frequency change and step),
    # where a piecewise-linear offset has its extremes; counted in max |offset| (discipline
    # gives the largest |offset| over its anchors, and the offsets just before steps)
    breakpoint_offsets_s: FloatArray = field(default_factory=lambda: np.zeros(0))
    # the same offsets at any other instants (elementwise: bit for bit what ``offsets_s`` holds
    # at instants in both), so callers can evaluate millions of them in bounded chunks
    offset_at: Callable[[FloatArray], FloatArray] | None = None


def free_offset_s(inputs: SimInputs, times_s: FloatArray) -> FloatArray:
    """``inputs.rate.free_offset_s`` bit for bit, vectorised (the oscillator's phase from 0)."""
    return inputs.rate.oscillator.phase_to_array(np.asarray(times_s, dtype=np.float64))


def run_none(inputs: SimInputs, times_s: FloatArray,
             progress: Fraction | None = None) -> Trajectory:
    def offset_at(t: FloatArray) -> FloatArray:
        return inputs.scenario.initial_offset_s + free_offset_s(inputs, t)

    return Trajectory(offset_at(times_s), offset_at=offset_at)


def vsock_delays(inputs: SimInputs, at_s: FloatArray, rng: np.random.Generator) -> FloatArray:
    """One-way vsock delays for messages sent at ``at_s``: base + jitter + load queueing."""
    net = inputs.scenario.network
    util = np.array([inputs.load.utilisation(float(t)) for t in at_s])
    jitter = rng.exponential(net.vsock_jitter_s, len(at_s)) if net.vsock_jitter_s > 0 else 0.0
    queue = rng.exponential(1.0, len(at_s)) * net.vsock_queue_s * util
    return net.vsock_delay_s + jitter + queue


def in_outage(inputs: SimInputs, at_s: FloatArray) -> npt.NDArray[np.bool_]:
    down = np.zeros(len(at_s), dtype=bool)
    for start, dur in inputs.scenario.network.outages:
        down |= (at_s >= start) & (at_s < start + dur)
    return down


def run_step(inputs: SimInputs, times_s: FloatArray,
             progress: Fraction | None = None) -> Trajectory:
    """Every interval: request over vsock, host reads its clock, guest sets it on arrival."""
    sc = inputs.scenario
    rng = np.random.default_rng([sc.seed, 0x57E9])
    sends = np.arange(sc.step_interval_s, sc.duration_s, sc.step_interval_s)
    out = vsock_delays(inputs, sends, rng)
    back = vsock_delays(inputs, sends + out, rng)
    # a read fails when the relay is down or the request or the reply is lost
    ok = ~in_outage(inputs, sends) & (rng.random(len(sends)) >= sc.network.loss)
    ok &= rng.random(len(sends)) >= sc.network.loss
    sets = (sends + out + back)[ok]
    host_err = sc.upstream_error_s  # the host's own clock error, it is "truth" to the guest
    after = -back[ok] + host_err  # guest reads host time, which is already `back` old
    free_at_set = free_offset_s(inputs, sets)
    before = np.empty_like(after)
    if len(sets):
        before[0] = sc.initial_offset_s + free_at_set[0]
        before[1:] = after[:-1] + free_at_set[1:] - free_at_set[:-1]
    jumps = after - before

    def offset_at(t: FloatArray) -> FloatArray:
        free = free_offset_s(inputs, t)
        offsets = sc.initial_offset_s + free
        k = np.searchsorted(sets, t, side="right") - 1
        stepped = k >= 0
        offsets[stepped] = after[k[stepped]] + free[stepped] - free_at_set[k[stepped]]
        return offsets

    return Trajectory(offset_at(times_s), jumps, sets, before,
                      extra={"step_reads": int(len(sets)), "failed_reads": int((~ok).sum())},
                      offset_at=offset_at)


def build_engine(inputs: SimInputs) -> Engine:
    """The real ``GuestController`` on a ``SimClock`` over the scenario's network, one upstream
    behind the relay (as the daemon names it), relay outages as connection losses."""
    # imported here: the engine is the heavy part, none/step runs do not need it
    from guest_client.controller import GuestController
    from sim.clock import SimClock
    from sim.engine import Engine, Upstream
    from sim.load import make_load
    from sim.network import Hop, HostSched, Network
    from timesyncd.discipline import DisciplineConfig

    sc, net = inputs.scenario, inputs.scenario.network
    seed = sc.seed
    clock = SimClock(inputs.rate.oscillator, start_unix_ns=sc.start_ns,
                     initial_offset_s=sc.initial_offset_s, read_noise_s=sc.read_noise_s,
                     rng=random.Random(f"read-noise/{seed}"))
    vsock = Hop(base_s=net.vsock_delay_s, jitter_s=net.vsock_jitter_s, loss=net.loss,
                load=inputs.load, queue_s=net.vsock_queue_s)
    upstream = Hop(base_s=net.upstream_delay_s, jitter_s=net.upstream_jitter_s,
                   asymmetry_s=net.asymmetry_s, loss=net.loss)
    host = None
    if net.host_load and net.relay_sched_s > 0:
        host = HostSched(make_load(net.host_load, seed=seed, horizon_s=sc.duration_s),
                         net.relay_sched_s, net.relay_kernel_stamps)
    server = Upstream("relay:vsock:2:4123#udp:ntp", Network(vsock, upstream, host=host),
                      error_s=sc.upstream_error_s)
    config = replace(DisciplineConfig(), minpoll=sc.minpoll, maxpoll=sc.maxpoll)
    controller = GuestController(config, random.Random(f"controller/{seed}"))
    engine = Engine(controller, clock, [server], random.Random(f"network/{seed}"))
    for start, duration in net.outages:
        engine.disconnect(start, duration)
    return engine


def run_discipline(inputs: SimInputs, times_s: FloatArray,
                   progress: Fraction | None = None) -> Trajectory:
    """One pass of the engine to the end, then the clock's offset at every requested instant
    from its anchors (exactly what reading it there during the run would have given).

    With ``progress`` the engine runs in chunks (it continues exactly where it stopped) and
    reports the fraction of virtual time done after each."""
    engine = build_engine(inputs)
    clock = engine.clock
    coverage = BoundCoverage(inputs.rate.oscillator.ppm_at, inputs.scenario.upstream_error_s)
    engine.sample_every_s = COVERAGE_EVERY_S
    engine.on_sample = coverage.sample
    end = max(inputs.scenario.duration_s, float(times_s[-1]) if len(times_s) else 0.0)
    if progress is None:
        engine.run(end)
    else:
        chunks = PROGRESS_CHUNKS
        for i in range(1, chunks + 1):
            engine.run(end * i / chunks)
            progress(i / chunks)
    offsets = clock.offsets_at(times_s)
    jump_t = np.array([t for t, _ in clock.steps])
    jumps = np.array([ns / 1e9 for _, ns in clock.steps])
    before = np.array(clock.offsets_before_steps_s)
    bp_max = clock.max_abs_breakpoint_offset_s()
    st = engine.controller.status(clock.now_ns())
    extra = {"controller_steps": st.steps, "refused_jumps": st.refused_jumps,
             "final_state": st.state, "frequency_ppm": round(st.frequency_ppm, 4),
             "packets_sent": engine.packets_sent,
             **coverage.summary(engine.round_trips_s, 2.0 ** inputs.scenario.maxpoll)}
    return Trajectory(offsets, jumps, jump_t, before, extra=extra, engine=engine,
                      breakpoint_offsets_s=np.concatenate([[bp_max], before]),
                      offset_at=clock.offsets_at)


#: The error bound is checked against the true offset this often (true seconds).
COVERAGE_EVERY_S = 10.0
#: Frequency errors count from here on (the first minutes are the estimate converging,
#: covered by the estimate's own uncertainty rather than the allowance).
FREQ_WARMUP_S = 600.0


class BoundCoverage:
    """Samples |true offset| against the controller's error bound, and the frequency error
    of its estimate (which the bound's allowance must cover), during a run."""

    def __init__(self, true_ppm: Callable[[float], float], reference_error_s: float = 0.0
                 ) -> None:
        self.true_ppm = true_ppm
        self.reference_error_s = reference_error_s
        self.ratios: list[float] = []
        self.bounds: list[float] = []
        self.max_freq_error_ppm = 0.0

    def sample(self, engine: Engine) -> None:
        now_ns = engine.clock.reading_ns()
        bound = engine.controller.error_bound(now_ns)
        true = abs(engine.clock.offset_s() - self.reference_error_s)
        self.ratios.append(true / bound.bound_s if bound.bound_s > 0 else math.inf)
        if bound.estimate_s is not None:
            self.bounds.append(bound.bound_s)
        if engine.now_s >= FREQ_WARMUP_S:
            err = abs(engine.controller.frequency_ppm - self.true_ppm(engine.now_s))
            self.max_freq_error_ppm = max(self.max_freq_error_ppm, err)

    def summary(self, round_trips_s: list[float], poll_s: float) -> dict[str, Any]:
        """Coverage figures; ``bound_over_target`` is the median bound over (median round
        trip / 2 + poll x 1 ppm), the usefulness target being <= 2."""
        r = np.array(self.ratios)
        median = float(np.median(self.bounds)) if self.bounds else None
        rtt = float(np.median(round_trips_s)) if round_trips_s else None
        ref = None if rtt is None else rtt / 2 + poll_s * 1e-6
        return {"bound_coverage": round(float(np.mean(r <= 1.0)), 6) if len(r) else 1.0,
                "max_true_over_bound": round(float(r.max()), 4) if len(r) else 0.0,
                "median_bound_s": median, "median_rtt_s": rtt,
                "bound_over_target": (round(median / ref, 3)
                                      if median is not None and ref else None),
                "max_freq_error_ppm": round(self.max_freq_error_ppm, 4)}


STRATEGY_FUNCS: dict[str, Callable[[SimInputs, FloatArray, Fraction | None], Trajectory]] = {
    "none": run_none,
    "step": run_step,
    "discipline": run_discipline,
}
