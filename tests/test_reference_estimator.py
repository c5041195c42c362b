"""The simulator's model-aware reference estimator (issue 16): a Kalman filter over phase and
frequency that knows the delay noise and the wander."""

from __future__ import annotations

import random

import numpy as np

from sim.reference_estimator import Exchange, kalman_errors, reference


def _exchanges(rng: random.Random, poll: float, n: int, jitter: float) -> list[Exchange]:
    out = []
    for i in range(n):
        sent = i * poll
        d_out, d_ret = 1e-4 + rng.expovariate(1 / jitter), 1e-4 + rng.expovariate(1 / jitter)
        out.append(Exchange(sent, sent + d_out + d_ret, (d_out - d_ret) / 2,
                            d_out + d_ret - 2e-4))
    return out


def test_noise_free_samples_give_the_truth_line() -> None:
    """A clock 50 ppm fast from 0.1 s, measured exactly: the filter's predictions match."""
    ex = _exchanges(random.Random(1), 64.0, 100, 1e-12)
    ex = [Exchange(e.sent_s, e.arrived_s, 0.0, 0.0) for e in ex]
    times = np.arange(1000.0, 6000.0, 1.0)
    err = kalman_errors(ex, 1e-12, lambda t: 0.1 + 50e-6 * t, times)
    assert np.max(np.abs(err)) < 1e-7


def test_beats_the_latest_sample_and_widens_with_the_poll() -> None:
    """On noisy samples the filter averages (well below one sample's error), and with the
    same wander a longer poll leaves it more to predict."""
    rng = random.Random(2)
    gen = np.random.default_rng(3)
    steps = gen.normal(0.0, 1e-9, 200_000)  # frequency random walk, 1e-9 per sqrt second
    phase = np.concatenate([[0.0], np.cumsum(np.cumsum(steps))])

    def truth(t: np.ndarray) -> np.ndarray:
        return 100e-6 * t + np.interp(t, np.arange(len(phase), dtype=float), phase)

    times = np.arange(20_000.0, 190_000.0, 1.0)
    short = reference(_exchanges(rng, 16.0, 12_000, 1e-4), 1e-9, truth, times)
    long = reference(_exchanges(rng, 1024.0, 190, 1e-4), 1e-9, truth, times)
    one_sample_rms = 1e-4 / np.sqrt(2)  # (out - ret) / 2 of two exponentials of mean 100 us
    assert short.rms_offset_s < one_sample_rms / 4
    assert short.rms_offset_s < long.rms_offset_s
