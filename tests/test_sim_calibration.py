"""Calibration of the simulated guest clock: idle loses 1.0 s/day; traffic makes it lose more."""

from __future__ import annotations

import numpy as np
import pytest

from sim.load import ConstantLoad
from sim.runner import build_inputs
from sim.scenario import DAY_S, Scenario
from sim.strategies import run_none


def loss_per_day(load: str, seed: int, days: float = 1.0) -> float:
    sc = Scenario(days=days, seed=seed, load=load, strategies=("none",))
    traj = run_none(build_inputs(sc), np.array([days * DAY_S]))
    return -float(traj.offsets_s[0]) / days


def test_idle_guest_loses_one_second_per_day_over_20_seeds() -> None:
    losses = [loss_per_day("constant", seed) for seed in range(1, 21)]
    assert np.mean(losses) == pytest.approx(1.0, rel=0.02)
    # wander is real (seeds differ) but small enough that every seed is near calibration
    assert len(set(losses)) == 20
    assert max(abs(x - 1.0) for x in losses) < 0.05


def test_load_makes_the_guest_lose_more() -> None:
    idle = loss_per_day("constant", 1)
    diurnal = loss_per_day("diurnal", 1)
    busy = loss_per_day("constant:1000", 1)
    assert idle < diurnal < busy
    # coupling -2.5 ppm at full load: 0.216 s/day more than idle
    assert busy - idle == pytest.approx(2.5e-6 * DAY_S, rel=0.05)


def test_coupling_integrates_exactly_over_load_changes() -> None:
    """The rate follows the profile: a burst shows up as extra loss over exactly its span."""
    sc = Scenario(days=1, wander_ppm_per_sqrt_s=0.0, strategies=("none",))
    inp = build_inputs(sc, ConstantLoad(500.0))
    off = inp.rate.free_offset_s(np.array([3600.0]))[0]
    assert off == pytest.approx(3600 * 1e-6 * (sc.base_ppm + 0.5 * sc.load_coupling_ppm),
                                rel=1e-9)
