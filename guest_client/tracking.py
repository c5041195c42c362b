"""The chronyc-tracking view of the controller: figures ``timesync status`` shows beside the
state (stratum, reference, leap status, RMS offset, skew, residual frequency, per-source
reach/poll/last receive), computed here so the controller only calls in.

Sans-IO: every function takes the controller's values and returns numbers or strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from guest_client.source import Source

#: chrony's names for the leap indicator (RFC 5905: 0 none, 1 insert, 2 delete, 3 unsync)
LEAP_STATUS = {0: "normal", 1: "insert second", 2: "delete second", 3: "not synchronised"}


@dataclass(slots=True)
class OffsetRms:
    """Running RMS of the offsets corrected at each clock update, like chrony's "RMS offset"
    (an exponential average, so one old excursion fades instead of dominating forever)."""

    weight: float = 1.0 / 8.0
    mean_square: float | None = None

    def add(self, offset_s: float) -> None:
        sq = offset_s * offset_s
        self.mean_square = sq if self.mean_square is None else (
            self.mean_square + self.weight * (sq - self.mean_square))

    @property
    def rms_s(self) -> float | None:
        return None if self.mean_square is None else math.sqrt(self.mean_square)


@dataclass(frozen=True, slots=True)
class Tracking:
    """The ``chronyc tracking`` fields ``timesync status`` adds to the controller's status."""

    stratum: int | None  # the selected sources' lowest stratum + 1
    reference: str | None  # the selected source with the smallest error
    leap_status: str
    rms_offset_s: float | None
    skew_ppm: float | None
    residual_freq_ppm: float | None  # the reference's own frequency estimate minus the one used
    remaining_correction_s: float | None  # offset still to be slewed out (guest - reference)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def leap_status(synchronised: bool, leap: int, leap_mode: str) -> str:
    """The leap status line: "not synchronised" until the clock is, then the majority's."""
    if not synchronised:
        return LEAP_STATUS[3]
    if leap_mode != "kernel" and leap in (1, 2):
        return f"{LEAP_STATUS[leap]} (ignored: leap_mode {leap_mode})"
    return LEAP_STATUS.get(leap, LEAP_STATUS[0])


def skew_ppm(slope_sd: float) -> float | None:
    """The frequency estimate's error bound, ppm (None until it is known)."""
    return slope_sd * 1e6 if math.isfinite(slope_sd) else None


def build_tracking(sources: Iterable[Source], to_unix: Callable[[float], float], *,
                   synced: bool, slope: float, slope_sd: float, leap: int, leap_mode: str,
                   rms_offset_s: float | None, remaining_s: float | None) -> Tracking:
    """Fill each source's reach/poll/last-receive/error columns and summarise the selected
    ones; ``to_unix`` maps the controller's time scale to Unix seconds."""
    strata: list[int] = []
    best: Source | None = None
    for src in sources:
        st, last = src.status, src.last_sample
        st.reach, st.poll = src.reach, src.effective_poll
        st.last_rx = None if src.last_sample_t is None else to_unix(src.last_sample_t)
        st.error_s = None if last is None else last.root_distance_s
        st.freq_ppm = None if src.estimate is None else src.estimate.slope * 1e6
        if not st.selected or last is None:
            continue
        if st.stratum is not None:
            strata.append(st.stratum)
        if best is None or best.last_sample is None or (
                last.root_distance_s < best.last_sample.root_distance_s):
            best = src
    residual = (None if best is None or best.estimate is None
                else (best.estimate.slope - slope) * 1e6)
    return Tracking(
        stratum=min(strata) + 1 if strata and synced else None,
        reference=best.name if best is not None and synced else None,
        leap_status=leap_status(synced, leap, leap_mode), rms_offset_s=rms_offset_s,
        skew_ppm=skew_ppm(slope_sd), residual_freq_ppm=residual if synced else None,
        remaining_correction_s=remaining_s)
