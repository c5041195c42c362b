"""Run a scenario: every strategy on the same inputs, tokens tallied exactly, results collected."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np

from sim.load import LoadProfile, make_load
from sim.report import StrategyResult
from sim.scenario import DAY_S, RateModel, Scenario
from sim.strategies import STRATEGY_FUNCS, FloatArray, SimInputs
from sim.tokens import NS, IntArray, TokenSchedule

#: Called with a strategy's name and the fraction of it done (0 when it starts).
Progress = Callable[[str, float], None]


def build_inputs(scenario: Scenario, load: LoadProfile | None = None) -> SimInputs:
    if load is None:
        load = make_load(scenario.load, seed=scenario.seed, horizon_s=scenario.duration_s)
    rate = RateModel(scenario, load)
    # the vectorised twin of RateModel's coupling term ``k * load.mean(0, t)`` (bit for bit;
    # tests/test_sim_speed.py checks it against the scalar path for every profile)
    k = scenario.load_coupling_ppm
    rate.oscillator.extra_mean_from_zero_ppm = lambda ts: k * load.mean_from_zero(ts)
    return SimInputs(scenario, load, rate)


def run_scenario(scenario: Scenario, *, load: LoadProfile | None = None,
                 progress: Progress | None = None) -> dict[str, StrategyResult]:
    """Run each of ``scenario.strategies``; returns results keyed by strategy name."""
    inputs = build_inputs(scenario, load)
    tokens = TokenSchedule(scenario.tokens, scenario.start_ns, scenario.duration_s, scenario.seed)
    last_token_ns = tokens.last_query_ns()
    n_days = int(np.ceil(scenario.duration_s / DAY_S - 1e-9))
    day_ends = np.minimum(np.arange(1, n_days + 1) * DAY_S, scenario.duration_s)
    grid = np.arange(0.0, scenario.duration_s, scenario.sample_interval_s)
    series_s = np.unique(np.concatenate([grid, day_ends]))
    # the strategies run to the last instant anyone reads (a token instant can lie a rounding
    # error past the end); token instants themselves are evaluated afterwards, in chunks
    eval_s = series_s
    if last_token_ns is not None:
        eval_s = np.unique(np.append(series_s, (last_token_ns - scenario.start_ns) / NS))
    results: dict[str, StrategyResult] = {}
    for name in scenario.strategies:
        report = None
        if progress:
            progress(name, 0.0)
            report = functools.partial(progress, name)
        started = time.perf_counter()
        traj = STRATEGY_FUNCS[name](inputs, eval_s, report)
        offsets = traj.offsets_s
        assert traj.offset_at is not None
        at_tokens = _TokenOffsets(traj.offset_at, scenario.start_ns)
        tally = tokens.tally(at_tokens)
        # series for plots/CSV, plus the instants around each jump (extremes of a sawtooth)
        ser_t, ser_o = series_s, offsets[np.searchsorted(eval_s, series_s)]
        if len(traj.jump_times_s):
            jt = traj.jump_times_s
            before = traj.offsets_at_jumps_before_s
            ser_t = np.concatenate([ser_t, jt, jt])
            ser_o = np.concatenate([ser_o, before, before + traj.jumps_s])
            order = np.argsort(ser_t, kind="stable")
            ser_t, ser_o = ser_t[order], ser_o[order]
        max_abs = float(max(np.max(np.abs(offsets)), np.max(np.abs(ser_o)), at_tokens.max_abs,
                            np.max(np.abs(traj.breakpoint_offsets_s), initial=0.0)))
        results[name] = StrategyResult(
            name=name, times_s=ser_t, offsets_s=ser_o, max_abs_offset_s=max_abs,
            offset_at_day_end_s=[float(x) for x in offsets[np.searchsorted(eval_s, day_ends)]],
            tokens=tally, forward_jumps=int((traj.jumps_s > 0).sum()),
            backward_jumps=int((traj.jumps_s < 0).sum()),
            jumps_s=[float(j) for j in traj.jumps_s], extra=traj.extra,
            wall_s=time.perf_counter() - started)
        del traj, at_tokens  # a discipline run's engine and anchors: free before the next
    return results


class _TokenOffsets:
    """Guest offsets (integer ns) at token instants (true Unix ns), evaluated in chunks so a
    year of tokens (millions of instants) needs no array of them all; remembers the largest
    |offset| seen, which counts in max |offset|."""

    CHUNK = 1 << 16

    def __init__(self, offset_at: Callable[[FloatArray], FloatArray], start_ns: int) -> None:
        self.offset_at = offset_at
        self.start_ns = start_ns
        self.max_abs = 0.0

    def __call__(self, at_ns: IntArray) -> IntArray:
        out = np.empty(len(at_ns), dtype=np.int64)
        for i in range(0, len(at_ns), self.CHUNK):
            t = (at_ns[i:i + self.CHUNK] - self.start_ns) / NS
            off = self.offset_at(t)
            if len(off):
                self.max_abs = max(self.max_abs, float(np.max(np.abs(off))))
            out[i:i + self.CHUNK] = np.rint(off * NS).astype(np.int64)
        return out


def run_lan_reference(seed: int, minpoll: int | None = None, maxpoll: int | None = None,
                      noisy: bool = False) -> dict[str, object]:
    """chrony's simulation-test model, run by the discipline engineer's ``sim.lan_reference``,
    at the given polls (16 s when not given) with the model-aware reference beside it;
    ``noisy`` takes the slow path (``lan-noisy``)."""
    from sim import lan_reference

    r = lan_reference.run(seed, minpoll=minpoll, maxpoll=maxpoll,
                          path=lan_reference.NOISY_PATH if noisy else lan_reference.LAN_PATH)
    return {"scenario": {"name": "lan-noisy" if noisy else "lan-reference", "seed": seed,
                         "minpoll": r.minpoll,
                         "maxpoll": r.maxpoll, "duration_s": r.duration_s},
            "strategies": {"discipline": {
                "rms_offset_s": r.rms_offset_s, "max_abs_offset_s": r.max_abs_offset_s,
                "rms_freq_error_ppm": r.rms_freq_error_ppm,
                "converged_after_s": r.converged_after_s, "steps": r.steps,
                "bound_coverage": round(r.bound_coverage, 6),
                "max_true_over_bound": round(r.max_true_over_bound, 4),
                "median_bound_s": r.median_bound_s, "median_rtt_s": r.median_rtt_s,
                "bound_over_target": round(
                    r.median_bound_s / (r.median_rtt_s / 2 + 2.0 ** r.maxpoll * 1e-6), 3),
                "max_freq_error_ppm": round(r.max_freq_error_ppm, 4)}},
            "reference": {"rms_offset_s": r.ref_rms_offset_s,
                          "max_abs_offset_s": r.ref_max_abs_offset_s}}
