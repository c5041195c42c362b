"""A reference estimator that knows the simulated noise model: what is achievable at a poll.

The controller has to learn the path and the clock; this estimator is told both. It runs a
Kalman filter over (phase, frequency) of the uncorrected oscillator on the same exchanges the
controller saw: each measurement's error is uniform within half its excess delay over the
model's known queue-free delay (variance ``excess**2 / 12``, exact for exponential jitter on
both legs), and the frequency is a random walk of the model's known wander. Between
measurements it predicts along its frequency, causally, like a clock it steered perfectly.

It is a linear reference, not a proof of optimality (the errors are bounded, not Gaussian, and
a non-linear estimator can beat it), but every figure of the controller can be read against
it: the gap is what the discipline loses by not knowing the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sim.network import Network


@dataclass
class Exchange:
    """One answered request in true time: send, midpoint and arrival, and its offset error."""

    sent_s: float
    arrived_s: float
    error_s: float  # measured minus true offset: (outbound - return delay) / 2
    excess_s: float  # round trip above the model's queue-free round trip


@dataclass(frozen=True)
class RecordingNetwork(Network):
    """A :class:`Network` that records every exchange (the engine sends a request's reply
    right after its request, so the last request is the one a reply answers)."""

    floor_rtt_s: float = 0.0
    exchanges: list[Exchange] = field(default_factory=list)
    _pending: list[tuple[float, float]] = field(default_factory=list)

    def request(self, true_s: float, rng: random.Random) -> tuple[float, float] | None:
        there = super().request(true_s, rng)
        self._pending.clear()
        if there is not None:
            self._pending.append((true_s, there[0]))
        return there

    def reply(self, true_s: float, rng: random.Random) -> tuple[float, float] | None:
        back = super().reply(true_s, rng)
        if back is not None and self._pending:
            sent, rx = self._pending[0]
            out, ret = rx - sent, back[0] - true_s
            self.exchanges.append(Exchange(sent, back[0], (out - ret) / 2,
                                           max(out + ret - self.floor_rtt_s, 0.0)))
        self._pending.clear()
        return back


@dataclass(frozen=True)
class ReferenceResult:
    rms_offset_s: float
    max_abs_offset_s: float


def kalman_errors(exchanges: list[Exchange], wander_per_sqrt_s: float,
                  truth: Callable[[np.ndarray], np.ndarray], times_s: np.ndarray) -> np.ndarray:
    """Causal phase error of the model-aware Kalman filter at each of ``times_s``.

    ``truth`` maps true times to the uncorrected oscillator's true phase (its offset from
    true time); each exchange measures it at the exchange's midpoint with the exchange's
    error. The filter starts on its first measurement, knowing no frequency (1000 ppm prior).
    """
    q = wander_per_sqrt_s ** 2
    mids = np.array([(ex.sent_s + ex.arrived_s) / 2 for ex in exchanges])
    out = np.full(len(times_s), np.nan)
    if not len(mids):
        return out
    z_all = truth(mids) + np.array([ex.error_s for ex in exchanges])
    ph = fr = 0.0
    p00 = p01 = p11 = 0.0
    est_ph: list[float] = []
    est_fr: list[float] = []
    for i, ex in enumerate(exchanges):
        r = max(ex.excess_s, 1e-6) ** 2 / 12.0  # a zero excess still gets ~0.3 us of noise
        z = float(z_all[i])
        if i == 0:
            ph, fr, p00, p01, p11 = z, 0.0, r, 0.0, 1e-6
        else:
            dt = float(mids[i] - mids[i - 1])
            ph += fr * dt
            p00 += 2 * dt * p01 + dt * dt * p11 + q * dt ** 3 / 3
            p01 += dt * p11 + q * dt * dt / 2
            p11 += q * dt
            s = p00 + r
            k0, k1 = p00 / s, p01 / s
            innov = z - ph
            ph += k0 * innov
            fr += k1 * innov
            # Joseph-stable for H = [1, 0]: P - K S K^T
            p00, p01, p11 = p00 - k0 * k0 * s, p01 - k0 * k1 * s, p11 - k1 * k1 * s
        est_ph.append(ph)
        est_fr.append(fr)
    arrived = np.array([ex.arrived_s for ex in exchanges])
    idx = np.searchsorted(arrived, times_s, side="right") - 1
    ok = idx >= 0
    k = idx[ok]
    pred = np.asarray(est_ph)[k] + np.asarray(est_fr)[k] * (times_s[ok] - mids[k])
    out[ok] = pred - truth(times_s[ok])
    return out


def reference(exchanges: list[Exchange], wander_per_sqrt_s: float,
              truth: Callable[[np.ndarray], np.ndarray], times_s: np.ndarray,
              ) -> ReferenceResult:
    """RMS and max |error| of :func:`kalman_errors` over ``times_s``."""
    err = kalman_errors(exchanges, wander_per_sqrt_s, truth, times_s)
    err = err[~np.isnan(err)]
    return ReferenceResult(float(np.sqrt(np.mean(err * err))), float(np.max(np.abs(err))))
