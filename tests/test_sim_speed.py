"""The simulator's fast paths give exactly what the slow ones would.

The discipline strategy runs its engine once and evaluates the clock at ~10^5 instants from the
clock's anchors; none/step use a vectorised phase. Each must equal, bit for bit, reading the
clock during the run (or the scalar integral), and max |offset| must see the breakpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.runner import build_inputs, run_scenario
from sim.scenario import Scenario
from sim.strategies import SimInputs, build_engine, run_discipline

LOADS = ["constant", "constant:700", "diurnal", "bursty", "trace"]


def _inputs(load: str, tmp_path: Path, **kw: Any) -> SimInputs:
    if load == "trace":
        path = tmp_path / "t.csv"
        path.write_text("time_s,requests_per_second\n0,100\n600.5,900\n4000,0\n")
        load = str(path)
    return build_inputs(Scenario(load=load, **kw))


@pytest.mark.parametrize("load", LOADS)
def test_vectorised_phase_equals_scalar_integral(load: str, tmp_path: Path) -> None:
    inputs = _inputs(load, tmp_path, days=2.0)
    osc = inputs.rate.oscillator
    rng = np.random.default_rng(5)
    t = np.sort(np.concatenate([[0.0, 1e-9, 10.0, 600.5, 4000.0, 86_400.0],
                                rng.uniform(0, 2 * 86_400, 3000)]))
    fast = osc.phase_to_array(t)
    assert np.array_equal(fast, inputs.rate.free_offset_s(t))  # RateModel's scalar loop
    assert np.array_equal(fast, [osc.phase_to(x) for x in t.tolist()])
    # without the vectorised coupling hook the generic per-element path agrees too
    osc.extra_mean_from_zero_ppm = None
    assert np.array_equal(osc.phase_to_array(t), fast)


@pytest.mark.parametrize("load", ["diurnal", "bursty"])
def test_offsets_after_the_run_equal_reading_the_clock_during_it(load: str,
                                                                  tmp_path: Path) -> None:
    """Path independence: stopping the engine at every instant changes nothing, and
    ``offsets_at`` afterwards gives the very same floats."""
    inputs = _inputs(load, tmp_path, days=0.1, minpoll=4, maxpoll=4)
    rng = np.random.default_rng(1)
    times = np.unique(np.concatenate([rng.uniform(0, 8640.0, 2000), np.arange(0, 8640.0, 16.0)]))
    stepwise = build_engine(inputs)
    during = []
    for t in times.tolist():
        stepwise.run(t)
        during.append(stepwise.clock.offset_s())
    stepwise.run(8640.0)
    once = build_engine(inputs)
    once.run(8640.0)
    assert np.array_equal(once.clock.offsets_at(times), np.array(during))
    assert once.clock.offset_s() == stepwise.clock.offset_s()
    assert once.packets_sent == stepwise.packets_sent > 500
    with pytest.raises(ValueError):
        once.clock.offsets_at(np.array([9000.0]))


def test_max_offset_includes_breakpoints_between_samples() -> None:
    sc = Scenario(days=0.5, strategies=("discipline",), minpoll=4, maxpoll=4)
    res = run_scenario(sc)["discipline"]
    traj = run_discipline(build_inputs(sc), np.arange(0.0, sc.duration_s, 60.0))
    assert traj.engine is not None
    bp_t, bp_o = traj.engine.clock.breakpoints()
    assert len(bp_t) > 2 * sc.duration_s / 16 * 0.9  # update and slew end per poll
    # the breakpoints are the clock's own offsets there
    assert np.array_equal(traj.engine.clock.offsets_at(bp_t), bp_o)
    sampled = float(np.max(np.abs(traj.offsets_s)))
    assert res.max_abs_offset_s == pytest.approx(max(sampled, float(np.max(np.abs(bp_o)))))
    assert res.max_abs_offset_s >= sampled


def test_discipline_steps_record_the_offset_before() -> None:
    sc = Scenario(days=0.05, strategies=("discipline",), initial_offset_s=2.5, minpoll=4,
                  maxpoll=4, wander_ppm_per_sqrt_s=0.0)
    res = run_scenario(sc)["discipline"]
    assert res.backward_jumps >= 1
    assert not np.isnan(res.offsets_s).any()
    assert res.max_abs_offset_s == pytest.approx(2.5, abs=0.01)  # the start, before the step
    first = int(np.argmax(np.abs(np.diff(res.offsets_s))))
    assert res.offsets_s[first] == pytest.approx(2.5, abs=0.01)
    assert abs(res.offsets_s[first + 1]) < 0.01
