"""The documented accuracy targets on chrony's simulation model (sim/lan_reference.py)."""

from __future__ import annotations

import statistics

from sim import lan_reference


def test_targets_seeds_1_to_10() -> None:
    results = [lan_reference.run(seed) for seed in range(1, 11)]
    assert statistics.median(r.rms_offset_s for r in results) <= 11e-6
    assert max(r.max_abs_offset_s for r in results) <= 120e-6
    for r in results:
        assert r.converged_after_s is not None and r.converged_after_s <= 60.0, r
        assert r.steps == 0  # 0.1 s is slewed, never stepped
        assert r.rms_freq_error_ppm < 0.2


def test_deterministic_per_seed() -> None:
    a = lan_reference.run(3, duration_s=3000.0, stats_from_s=1000.0)
    b = lan_reference.run(3, duration_s=3000.0, stats_from_s=1000.0)
    assert a == b
