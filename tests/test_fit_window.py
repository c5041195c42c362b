"""Issue 16: the fit window adapts to noise and wander; no sample dominates the fit."""

from __future__ import annotations

import random

from timesyncd import fit_window
from timesyncd.filter import FilteredSample, SampleFilter
from timesyncd.fit import fit, fit_filter


def _lan_sample(rng: random.Random, x: float, truth: float) -> FilteredSample:
    out, ret = rng.expovariate(1 / 100e-6), rng.expovariate(1 / 100e-6)
    return FilteredSample(x, truth + (out - ret) / 2, 200e-6 + out + ret, 1e-7, 1e-4)


def test_a_clamped_zero_delay_cannot_hold_the_fit() -> None:
    """One sample whose delay came out as 0 and whose offset is 300 us off: the fit must stay
    with the other 39 (it used to follow the one sample, 150-300 us off)."""
    rng = random.Random(4)
    f = SampleFilter(max_samples=64)
    for i in range(40):
        x = i * 16.0
        s = _lan_sample(rng, x, 2e-6 * x)
        if i == 30:
            s = FilteredSample(x, 2e-6 * x + 300e-6, 0.0, 1e-7, 1e-4)
        assert f.add(s) is None
    assert f.delay_floor() is not None and f.delay_floor() > 150e-6  # not the clamped zero
    est = fit_filter(f, 39 * 16.0)
    assert est is not None
    assert abs(est.offset - 2e-6 * 39 * 16.0) < 40e-6, est


def test_no_row_carries_more_than_its_share() -> None:
    rng = random.Random(5)
    samples = [_lan_sample(rng, i * 16.0, 0.0) for i in range(32)]
    samples[10] = FilteredSample(160.0, 0.0, 200e-6, 1e-7, 1e-4)  # exactly at the floor
    f = SampleFilter(max_samples=64)
    for s in samples:
        f.add(s)
    win = f.window
    capped = fit_window.capped_moments(win, win.lo)
    sw = capped.moments(0)[0]
    share = fit_window.MAX_WEIGHT_SHARE
    assert max(min(w, share * sw) for w in win.w[win.lo:]) <= share * sw * (1 + 1e-6)
    assert fit_window.weight_capped(win, win.lo) == (max(win.w[win.lo:]) > share * sum(
        win.w[win.lo:]))


def test_window_follows_a_wandering_frequency_at_a_long_poll() -> None:
    """1024 s polls, frequency drifting by 100 ppb per 10,000 s: the fit uses the last few
    samples, not 16 (4.5 hours, which put it 100-200 us off)."""
    rng = random.Random(6)
    a = 5e-12  # phase = a * x**2: the frequency changes by 2a per second

    def truth(x: float) -> float:
        return 1e-5 * x + a * x * x

    samples = []
    for i in range(40):
        x = i * 1024.0
        out, ret = rng.expovariate(1 / 10e-6), rng.expovariate(1 / 10e-6)
        samples.append(FilteredSample(x, truth(x) + (out - ret) / 2, 200e-6 + out + ret,
                                      1e-7, 1e-4))
    at = 39 * 1024.0
    est = fit(samples, at, floor=200e-6)
    assert est is not None
    assert est.used < 16
    assert abs(est.offset - truth(at)) < 30e-6, (est, truth(at))


def test_window_stays_long_on_a_straight_line_at_a_short_poll() -> None:
    rng = random.Random(7)
    samples = [_lan_sample(rng, i * 16.0, 1e-6 * i * 16.0) for i in range(128)]
    est = fit(samples, 127 * 16.0, floor=200e-6)
    assert est is not None and est.used >= 32
    assert abs(est.offset - 1e-6 * 127 * 16.0) < 20e-6
