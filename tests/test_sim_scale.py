"""The simulator at a year's scale: memory that grows by bytes per step, not by Python objects,
and token checks evaluated in chunks with exactly the results of one pass."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from sim import clock as sim_clock
from sim import oscillator as sim_oscillator
from sim import runner
from sim.clock import SimClock
from sim.oscillator import Oscillator
from sim.runner import run_scenario
from sim.scenario import DAY_S, Scenario
from sim.tokens import TokenSchedule

MB = 1 << 20


def _peak_mb(fn) -> float:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


def test_a_year_of_oscillator_wander_is_packed() -> None:
    """3.2 M wander steps (a year at 10 s): level and phase as 8-byte doubles (~50 MB), where
    float lists plus numpy blocks took ~250 MB; scalar and vector reads still agree."""
    osc = Oscillator(base_ppm=-11.574, wander_ppm_per_sqrt_s=2e-4, rng=random.Random(1),
                     step_s=10.0)
    peak = _peak_mb(lambda: osc.phase_to_array(np.array([365 * DAY_S])))
    assert peak < 80, peak
    t = np.array([0.5, 1e5, 3e7, 365 * DAY_S - 1])
    assert np.array_equal(osc.phase_to_array(t), [osc.phase_to(x) for x in t.tolist()])
    osc.phase_to(366 * DAY_S)  # grows again after numpy has viewed it
    assert isinstance(osc.ppm_at(1e7), float)


def test_clock_anchors_are_packed_and_read_back_exactly() -> None:
    osc = Oscillator(base_ppm=-11.574, rng=random.Random(2), step_s=10.0)
    clock = SimClock(osc, start_unix_ns=0)
    rng = random.Random(3)
    osc.phase_to(200_000 * 15.0)  # the wander drawn beforehand: measure the anchors alone

    def changes() -> None:
        for i in range(200_000):
            clock.advance_to(i * 15.0)
            clock.set_frequency(rng.uniform(-20, 20))

    assert _peak_mb(changes) < 12  # 6.4 MB: 32 bytes an anchor (a tuple of floats: ~150)
    t = np.sort(np.random.default_rng(4).uniform(0, clock.true_s, 1000))
    expect = []
    for x in t.tolist():  # the formula of the module docstring, anchor by anchor
        a_t, a_r, a_p, rate = (np.frombuffer(c)[int(np.searchsorted(np.frombuffer(
            clock._anchors[0]), x, side="right")) - 1] for c in clock._anchors)
        expect.append(a_r + rate * ((x - a_t) + (osc.phase_to(x) - a_p)) - x)
    assert np.array_equal(clock.offsets_at(t), np.array(expect))


@pytest.mark.parametrize("strategy", ["none", "step", "discipline"])
def test_tokens_and_offsets_in_small_chunks_change_nothing(strategy: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sc = Scenario(days=0.5, seed=2, strategies=(strategy,))
    whole = run_scenario(sc)[strategy]
    monkeypatch.setattr(runner._TokenOffsets, "CHUNK", 97)
    monkeypatch.setattr(TokenSchedule, "CHUNK", 61)
    monkeypatch.setattr(sim_oscillator, "_CHUNK", 53)
    monkeypatch.setattr(sim_clock, "_CHUNK", 41)
    chunked = run_scenario(sc)[strategy]
    assert chunked.max_abs_offset_s == whole.max_abs_offset_s
    assert np.array_equal(chunked.offsets_s, whole.offsets_s)
    for kind, t in whole.tokens.items():
        c = chunked.tokens[kind]
        assert (c.rejected, c.accepted_expired, c.issued) == (t.rejected, t.accepted_expired,
                                                             t.issued)
        assert np.array_equal(c.rejection_times_s, t.rejection_times_s)
