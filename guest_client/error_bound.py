"""The guest's error bound: how far the clock *reading* may be from the reference. Sans-IO.

An application (and the kernel's ``maxerror``) needs a bound around what the clock reads
now, not around the controller's estimate of its offset. So the bound adds up:

* the remaining uncorrected offset: the estimate of where the clock is now, including the
  rest of any slew still being applied;
* the selection distance at the last update: root delay / 2 + root dispersion of the
  sources, each sample's own delay / 2 and dispersion, and the estimate's uncertainty
  (:func:`timesyncd.selection.select` combines the truechimers' intervals), and at least
  what the recent samples guarantee, each carried to now at PHI + the frequency sd below;
* time since that update x (the frequency-error allowance ``max_clock_error_ppm`` + the
  frequency estimate's standard error): what an oscillator that wanders, or a drift
  model whose load changed, can add while no sample arrives. The sd is the larger of the
  fit's own and its distance to a line that trusts no path floor
  (:func:`guest_client.candidates.bound_terms`): with the floor overestimated the fit's
  own sd said 4 ppm of a slope 35 ppm off;
* a jump the guest refuses to follow: from the first refused sample on which every usable
  source whose jumps count reports it (not before ``jump_confirm_samples`` agree, which
  would leave the bound wrong for several polls), the truth as those sources define it is
  that far away. A lone liar among agreeing sources does not widen it.

``root_distance_s`` keeps chrony's meaning beside it: the distance plus a slow growth, around
the *estimate*. One definition, read by the kernel status, ``timesync status``, the health
reports (and so ``/metrics``) and ``wait-sync``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Kernel maxerror/esterror saturate here (Linux NTP_PHASE_LIMIT is 16 s): "no bound".
MAX_BOUND_S = 16.0
#: Cap on the frequency estimate's standard error used for growth (an unfitted slope is inf).
MAX_FREQ_SD = 1e-3
_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class ErrorBound:
    """|clock reading - reference| <= ``bound_s`` at the clock reading ``as_of_ns``, growing
    by ``growth`` seconds per second until the next update (see :meth:`at`)."""

    as_of_ns: int
    bound_s: float
    estimate_s: float | None  # estimated clock minus reference at as_of (None: no update yet)
    growth: float  # seconds per second (dimensionless rate): allowance + frequency sd
    verified: bool = True  # False from a link loss until a sample after reconnect agrees

    def at(self, now_ns: int) -> float:
        """The bound at a later clock reading (never below ``bound_s``, capped)."""
        dt = max(now_ns - self.as_of_ns, 0) / _NS
        return min(self.bound_s + self.growth * dt, MAX_BOUND_S)

    @property
    def growth_ppm(self) -> float:
        return self.growth * 1e6


@dataclass(frozen=True, slots=True)
class BoundBasis:
    """What a clock update leaves for the bound: when (controller seconds), the selection
    distance around the estimate, and the frequency estimate's standard error."""

    t: float
    distance_s: float
    freq_sd: float


def growth_rate(basis: BoundBasis | None, allowance_ppm: float) -> float:
    """How fast the bound widens without samples (fraction)."""
    sd = MAX_FREQ_SD if basis is None else min(basis.freq_sd, MAX_FREQ_SD)
    return allowance_ppm * 1e-6 + sd


def compute(basis: BoundBasis | None, now: float, now_ns: int, estimate_s: float | None,
            allowance_ppm: float, disagreement_s: float = 0.0,
            verified: bool = True) -> ErrorBound:
    """The :class:`ErrorBound` at controller time ``now`` (clock reading ``now_ns``)."""
    growth = growth_rate(basis, allowance_ppm)
    if basis is None or estimate_s is None:
        return ErrorBound(now_ns, MAX_BOUND_S, None, growth, verified)
    age = max(now - basis.t, 0.0)
    bound = abs(estimate_s) + basis.distance_s + growth * age + abs(disagreement_s)
    return ErrorBound(now_ns, min(bound, MAX_BOUND_S), estimate_s, growth, verified)


def root_distance(basis: BoundBasis | None, now: float, drift_ppm: float) -> float | None:
    """chrony's root distance: the distance around the estimate, grown at ``drift_ppm`` plus
    the frequency sd since the update (no remaining offset, no disagreement)."""
    if basis is None:
        return None
    rate = drift_ppm * 1e-6 + min(basis.freq_sd, MAX_FREQ_SD)
    return min(basis.distance_s + rate * max(now - basis.t, 0.0), MAX_BOUND_S)
