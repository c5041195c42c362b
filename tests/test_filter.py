from __future__ import annotations

import random

import pytest

from timesyncd.filter import FilteredSample, SampleFilter, sample_variance
from timesyncd.fit import fit, fit_filter


def s(x: float, delay: float, y: float = 0.0) -> FilteredSample:
    return FilteredSample(x=x, y=y, delay_s=delay, dispersion_s=0.0, root_distance_s=delay / 2)


def test_delay_spike_rejected_after_warmup_and_jitter_kept() -> None:
    f = SampleFilter(max_samples=8, max_delay_dev_ratio=10.0)
    assert f.add(s(0, 5e-3)) is None  # no history yet: nothing is a spike
    f.clear()
    for i, d in enumerate((200e-6, 250e-6, 300e-6, 220e-6, 400e-6)):
        assert f.add(s(i, d)) is None
    assert f.add(s(10, 5e-3)) == "delay_spike"  # 4.8 ms excess vs ~50 us median excess
    assert f.add(s(11, 600e-6)) is None
    assert len(f) == 6


def test_a_lasting_delay_shift_is_kept_after_two_spikes_not_rejected_forever() -> None:
    """A loaded host slows every exchange at once: after two rejections the new delay level
    is the path, and its samples are kept again (down-weighted) instead of starving the
    source into holdover."""
    f = SampleFilter(max_samples=64, max_delay_dev_ratio=10.0)
    for i in range(16):
        assert f.add(s(i, 40e-6 + (i % 3) * 2e-6)) is None  # quiet loopback, ~2 us jitter
    verdicts = [f.add(s(100 + i, 400e-6 + (i % 2) * 30e-6)) for i in range(12)]
    assert verdicts[:2] == ["delay_spike", "delay_spike"]
    assert verdicts[2:] == [None] * 10
    assert len(f) == 26


def test_isolated_spikes_stay_rejected_between_normal_samples() -> None:
    f = SampleFilter(max_samples=64, max_delay_dev_ratio=10.0)
    for i in range(16):
        f.add(s(i, 40e-6 + (i % 3) * 2e-6))
    verdicts = [f.add(s(100 + i, 5e-3 if i % 3 == 0 else 41e-6)) for i in range(30)]
    assert verdicts.count("delay_spike") == 10  # every spike, none of the normal ones
    assert all(v == "delay_spike" for v in verdicts[::3])


def test_window_limit_prune_and_arrays_stay_in_sync() -> None:
    f = SampleFilter(max_samples=4, max_delay_dev_ratio=0.0)
    for i in range(11):
        f.add(s(float(i), 1e-4, y=float(i) * 2))
    x, y, d, _ = f.columns()
    assert x == [7.0, 8.0, 9.0, 10.0] and y == [14.0, 16.0, 18.0, 20.0]
    assert len(f.window) == 4
    f.prune(2)
    x, y, _, _ = f.columns()
    assert x == [9.0, 10.0] and [p.x for p in f] == [9.0, 10.0] and len(f.window) == 2
    f.add(s(11.0, 1e-4))
    assert f.columns()[0] == [9.0, 10.0, 11.0] and len(f.window) == 3
    assert d == [1e-4] * 4


def test_variance_grows_with_excess_delay() -> None:
    low = sample_variance(s(0, 200e-6), 200e-6)
    high = sample_variance(s(0, 400e-6), 200e-6)
    assert low < 2e-12
    assert abs(high - (200e-6) ** 2 / 12) < 2e-12


def test_delay_floor_remembers_the_queue_free_delay_for_its_span() -> None:
    f = SampleFilter(max_samples=4, max_delay_dev_ratio=0.0, floor_span_s=800.0)
    f.add(s(0.0, 500e-6))
    for i in range(1, 8):  # a loaded path: the window forgets the 500 us sample, the floor not
        f.add(s(i * 50.0, 5e-3 + i * 1e-4))
    assert f.min_delay() is not None and f.min_delay() > 5e-3
    assert f.delay_floor() == 500e-6
    for i in range(8, 30):
        f.add(s(i * 50.0, 5e-3))
    assert f.delay_floor() == 5e-3  # older than the span: the path may have changed
    f.clear()
    assert f.delay_floor() is None


def test_window_fit_matches_a_fresh_fit_through_evictions_prunes_and_floor_changes() -> None:
    """The incremental window (prefix sums, detrended origin, cached weights) must give the
    fit a from-scratch computation gives on the same samples, whatever happened before."""
    rng = random.Random(4)
    f = SampleFilter(max_samples=32, max_delay_dev_ratio=0.0, floor_span_s=2000.0)
    x = 1e6  # days into uncorrected time, offset drifting at 80 ppm: raw sums would cancel
    for i in range(400):
        x += 16.0
        delay = 300e-6 + rng.expovariate(1 / 2e-3) * (3 if 150 < i < 200 else 1)
        f.add(s(x, delay, y=20.0 + 80e-6 * x + rng.uniform(-delay, delay) / 4))
        if i % 37 == 36:
            f.prune(len(f) // 2)
        if i % 9 == 0 or i > 390:
            floor = f.delay_floor()
            inc = fit_filter(f, x + 1.0)
            ref = fit(f.samples, x + 1.0, floor=floor)
            assert inc is not None and ref is not None
            assert inc.used == ref.used and inc.total == ref.total == len(f)
            assert abs(inc.offset - ref.offset) < 1e-12
            assert abs(inc.slope - ref.slope) < 1e-14
            assert inc.offset_sd == pytest.approx(ref.offset_sd, rel=1e-6)
            assert inc.slope_sd == pytest.approx(ref.slope_sd, rel=1e-6)



def test_window_offset_is_the_midpoint_of_the_bound_intersection() -> None:
    """Checked against a brute-force intersection of every kept sample's error bound."""
    rng = random.Random(9)
    f = SampleFilter(max_samples=128, max_delay_dev_ratio=0.0)
    x, checked = 5e5, 0
    for i in range(300):
        x += 16.0
        out, back = rng.expovariate(1 / 1e-3), rng.expovariate(1 / 1e-3)
        f.add(FilteredSample(x, 3.0 - 12e-6 * x + (out - back) / 2, 400e-6 + out + back,
                             2e-7, 1e-3))
        if i < 20:
            continue
        at = x + 2.0
        est = fit_filter(f, at)
        assert est is not None
        floor = f.delay_floor()
        assert floor is not None
        kept = f.samples[-est.used:]
        k = 4.0 * est.slope_sd
        lo = max(p.y - est.slope * (p.x - at) - (max(p.delay_s - floor, 0) + 10e-6) / 2
                 - p.dispersion_s - k * abs(p.x - at) for p in kept)
        hi = min(p.y - est.slope * (p.x - at) + (max(p.delay_s - floor, 0) + 10e-6) / 2
                 + p.dispersion_s + k * abs(p.x - at) for p in kept)
        if lo <= hi:
            checked += 1
            assert abs(est.offset - (lo + hi) / 2) < 1e-12
        f.prune(est.used)
    assert checked > 200


@pytest.mark.parametrize("pattern,kept", [("HHLLL", 0), ("HLHLL", 0), ("HHHLL", 22)])
def test_a_level_shift_needs_most_of_the_last_five(pattern: str, kept: int) -> None:
    """2 spikes in 5 stay spikes however they are spread; 3 in 5 are the path's new level."""
    f = SampleFilter(max_samples=64, max_delay_dev_ratio=10.0)
    for i in range(16):
        f.add(s(i, 40e-6 + (i % 3) * 2e-6))
    high = [pattern[i % 5] == "H" for i in range(40)]
    verdicts = [f.add(s(100 + i, 5e-3 if h else 41e-6)) for i, h in enumerate(high)]
    assert sum(1 for v, h in zip(verdicts, high, strict=True) if h and v is None) == kept
    assert all(v is None for v, h in zip(verdicts, high, strict=True) if not h)


def test_best_distance_is_the_best_recent_sample_aged_not_the_newest() -> None:
    f = SampleFilter(max_samples=64, max_delay_dev_ratio=0.0)
    f.add(FilteredSample(x=0.0, y=0.0, delay_s=1e-4, dispersion_s=0.0, root_distance_s=1e-3))
    f.add(FilteredSample(x=16.0, y=0.0, delay_s=0.1, dispersion_s=0.0, root_distance_s=0.05))
    # the slow newest sample would say 50 ms; the good one 32 s older is 1 ms + 15 ppm x 32 s
    assert f.best_distance(32.0, 15e-6) == pytest.approx(1e-3 + 15e-6 * 32)
    for i in range(8):  # once the good sample is not among the last 8, the bound says so
        f.add(FilteredSample(x=17.0 + i, y=0.0, delay_s=0.1, dispersion_s=0.0,
                             root_distance_s=0.05))
    assert f.best_distance(32.0, 15e-6) == pytest.approx(0.05 + 15e-6 * 8)
