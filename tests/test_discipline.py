from __future__ import annotations

import random

import pytest

from sim.clock import SimClock
from sim.oscillator import Oscillator
from timesyncd.correction import CorrectionModel
from timesyncd.discipline import DisciplineConfig
from timesyncd.filter import FilteredSample
from timesyncd.fit import fit, fit_early
from timesyncd.poll import PollState
from timesyncd.slew import slew_plan


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


def _queued(seed: int, n: int, dt: float, queue_s: float, slope: float) -> list[FilteredSample]:
    """Samples of a clock with native ``slope`` behind exponential queueing both ways."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        out, back = rng.expovariate(1 / queue_s), rng.expovariate(1 / queue_s)
        x = i * dt
        samples.append(FilteredSample(x, slope * x + (out - back) / 2, 500e-6 + out + back,
                                      0.0, 1e-3))
    return samples


def test_early_fit_keeps_a_burst_slope_sane_under_queueing() -> None:
    """A start-up burst (2 s apart, 3 ms queueing): trusting the smallest delay so far as
    the floor gives slopes hundreds of ppm off; the early fit stays near the prior."""
    worst_floor = worst_early = 0.0
    for n in (2, 4, 8, 12):
        for seed in range(50):
            s = _queued(seed, n, 2.0, 3e-3, -12e-6)
            floored = fit(s, s[-1].x, floor=min(p.delay_s for p in s))
            assert floored is not None
            early = fit_early(s, s[-1].x, prior_slope=-10e-6)
            worst_floor = max(worst_floor, abs(floored.slope + 12e-6))
            worst_early = max(worst_early, abs(early.slope + 12e-6))
            assert early.used == early.total == n
    assert worst_floor > 400e-6
    assert worst_early < 40e-6


def test_early_fit_follows_the_data_over_a_longer_span() -> None:
    """The prior only holds over seconds: four samples 16 s apart find a 100 ppm clock."""
    for seed in range(50):
        s = _queued(seed, 4, 16.0, 100e-6, 100e-6)
        est = fit_early(s, s[-1].x)
        assert 90e-6 < est.slope < 102e-6
        assert abs(est.offset - 100e-6 * s[-1].x) < 200e-6


def test_runs_test_rarely_prunes_a_straight_line_under_queueing() -> None:
    """Each update runs the test and a failure prunes for good: on a true line behind heavy
    queueing (4.5 ms, vsock at peak) false alarms must stay rare."""
    pruned = 0
    for seed in range(200):
        s = _queued(seed, 128, 32.0, 4.5e-3, -12e-6)
        est = fit(s, s[-1].x, floor=500e-6)
        assert est is not None
        pruned += est.used < est.total
    assert pruned <= 4  # 2 % (z = 1.64 pruned 3.5 %)


def test_a_frequency_change_retimed_to_when_it_landed() -> None:
    """``applied_at``: the previous rate ran until the change landed; a step's time is left
    alone (it changes nothing at an unchanged rate)."""
    m = CorrectionModel(0.0, 0.0)
    m.set_frequency(10.0, 0.01)  # decided at 10 s, landed at 10.005 s
    m.applied_at(10.005)
    assert m.correction_at(10.005) == pytest.approx(0.0, abs=1e-12)
    assert m.correction_at(11.005) == pytest.approx(0.01 / 1.01, rel=1e-9)
    m.applied_at(10.001)  # never earlier than the decision
    assert m.correction_at(11.005) == pytest.approx(0.01 / 1.01, rel=1e-9)
    m.step(20.0, 0.5)
    before = m.correction_at(21.0)
    m.applied_at(20.7)  # the newest segment is a step: nothing to retime
    assert m.correction_at(21.0) == before
