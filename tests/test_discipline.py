from __future__ import annotations

import random

import pytest

from sim.clock import SimClock
from sim.oscillator import Oscillator
from timesyncd.discipline import CorrectionModel, DisciplineConfig, PollState, fit, slew_plan
from timesyncd.filter import FilteredSample


def test_correction_model_matches_a_clock_under_slews_and_steps() -> None:
    """The model's uncorrected time must track a clock with no corrections exactly."""
    osc = Oscillator(80.0)
    clock = SimClock(osc, start_unix_ns=0)
    free = SimClock(Oscillator(80.0), start_unix_ns=0)
    model = CorrectionModel()
    rng = random.Random(2)
    for i in range(1, 60):
        t = i * 7.3
        clock.advance_to(t)
        free.advance_to(t)
        now = clock.now_ns() / 1e9
        assert abs(model.uncorrected(now) - free.now_ns() / 1e9) < 2e-9
        if i % 7 == 0:
            delta = rng.uniform(-2, 2)
            clock.step(round(delta * 1e9))
            model.step(now, round(delta * 1e9) / 1e9)
        else:
            ppm = rng.uniform(-83_333, 83_333)
            clock.set_frequency(ppm)
            model.set_frequency(now, ppm * 1e-6)


@pytest.mark.parametrize("offset", [0.1, -0.5, 3e-5, -2e-6])
def test_slew_plan_removes_offset_exactly(offset: float) -> None:
    slope = 120e-6  # native error
    freq, duration = slew_plan(offset, slope, 83_333.0, 1.0)
    assert abs(freq) <= 0.083333 + 1e-12 and duration >= 1.0
    # offset changes at (slope + c)/(1 + c) per second of clock time
    after = offset + (slope + freq) / (1 + freq) * duration
    assert abs(after) < 1e-12
    base, zero = slew_plan(0.0, slope, 83_333.0, 1.0)
    assert base == -slope and zero == 0.0


def test_fit_recovers_line_and_weights_low_delay() -> None:
    rng = random.Random(1)
    samples = []
    for i in range(40):
        x = i * 16.0
        excess = rng.expovariate(1 / 100e-6) + rng.expovariate(1 / 100e-6)
        err = rng.uniform(-excess / 2, excess / 2)
        samples.append(FilteredSample(x, 0.01 + 5e-6 * x + err, 200e-6 + excess, 1e-6, 1e-4))
    est = fit(samples, 640.0)
    assert est is not None and est.used == 40
    assert abs(est.offset - (0.01 + 5e-6 * 640)) < 15e-6
    assert abs(est.slope - 5e-6) < 0.05e-6
    assert est.offset_sd < 20e-6


def test_runs_test_drops_samples_from_before_a_frequency_change() -> None:
    samples = []
    for i in range(48):
        x = i * 16.0
        y = 1e-6 * x if i < 32 else 1e-6 * 512 + 20e-6 * (x - 512)  # 19 ppm change
        samples.append(FilteredSample(x, y + (1e-7 if i % 2 else -1e-7), 2e-4, 1e-6, 1e-4))
    est = fit(samples, 47 * 16.0)
    assert est is not None and est.used <= 24
    assert abs(est.slope - 20e-6) < 2e-6


def test_single_sample_uses_prior_slope() -> None:
    est = fit([FilteredSample(0.0, 0.2, 1e-4, 1e-6, 1e-4)], 10.0, prior_slope=1e-5)
    assert est is not None and est.offset == pytest.approx(0.2 + 1e-4)


def test_poll_adapts_within_bounds() -> None:
    good = fit([FilteredSample(float(i), 0.0, 1e-4, 1e-6, 1e-4) for i in range(16)], 16.0)
    assert good is not None
    p = PollState(2)
    for _ in range(40):
        p.update(good, 2, 5)
    assert p.poll == 5


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="minpoll"):
        DisciplineConfig(minpoll=6, maxpoll=4)
    with pytest.raises(ValueError, match="leap_mode"):
        DisciplineConfig(leap_mode="smear")
    for f in DisciplineConfig.__dataclass_fields__.values():
        assert f.metadata.get("help"), f.name


def test_error_bounds_beat_least_squares_under_queueing() -> None:
    """Exponential queueing both ways (mean 3 ms): bounding each sample's error by half its
    excess delay over the path floor pins the offset far better than weighting alone."""
    errors: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(20):
        rng = random.Random(seed)
        samples = []
        for i in range(128):
            out, back = rng.expovariate(1 / 3e-3), rng.expovariate(1 / 3e-3)
            x = i * 32.0
            samples.append(FilteredSample(x, 0.002 + 3e-6 * x + (out - back) / 2,
                                          500e-6 + out + back, 0.0, 1e-3))
        for bounded in (False, True):
            est = fit(samples, 127 * 32.0, floor=500e-6 if bounded else None)
            assert est is not None
            errors[bounded].append(abs(est.offset - (0.002 + 3e-6 * 127 * 32.0)))
    assert max(errors[True]) < 200e-6
    assert sum(errors[True]) < 0.65 * sum(errors[False])
