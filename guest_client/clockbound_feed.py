"""What the guest publishes in the ClockBound segment, from what the controller knows.

:func:`guest_bound` is the one adapter from the controller's status to a bound around the
clock reading; everything downstream (:func:`published_bound`, the writer) only sees its
:class:`GuestBound`. Today the controller exposes ``root_distance_s`` (the error of its
estimate, growing with the frequency allowance since the last update) and
``current_offset`` (the estimated offset still in the clock: the slew in progress plus any
part not yet corrected). The clock's true error is within ``offset +- distance``, so the
bound is ``|offset| + distance``. Mid-slew it stays true for a reader that only widens it by
the drift allowance: the slew moves the clock toward the estimate, never past it, so the
error it removes is subtracted from ``|offset|`` and never added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from guest_client.clockbound_writer import UNKNOWN_BOUND_NS, PublishedBound
from guest_client.controller import GuestController
from timesyncd.clockbound import ClockStatus

_NS = 1_000_000_000
#: Bound published while nothing is known (status UNKNOWN): the kernel's maxerror ceiling.
UNKNOWN_BOUND_S = UNKNOWN_BOUND_NS / _NS
_STATUS = {"synchronised": ClockStatus.SYNCHRONIZED, "holdover": ClockStatus.FREE_RUNNING}


@dataclass(frozen=True, slots=True)
class GuestBound:
    """``|clock - true time| <= bound_s`` at the reading it was computed for; it grows by at
    most ``drift`` (seconds per second) afterwards."""

    state: str
    bound_s: float | None
    drift: float


def guest_bound(controller: GuestController, now_ns: int) -> GuestBound:
    """The bound around the clock reading ``now_ns`` (see the module doc)."""
    st = controller.status(now_ns)
    allowance = controller.config.holdover_drift_ppm * 1e-6
    if st.root_distance_s is None:
        return GuestBound(st.state, None, allowance)
    # the growth rate of root_distance: its allowance for frequency error
    later = controller.status(now_ns + _NS).root_distance_s
    drift = max(allowance, (later or 0.0) - st.root_distance_s)
    offset = controller.current_offset(now_ns)
    return GuestBound(st.state, st.root_distance_s + abs(offset or 0.0), drift)


def published_bound(gb: GuestBound, as_of_mono_ns: int, coarse_res_ns: int) -> PublishedBound:
    """The segment's fields for ``gb``, computed at a clock reading taken right after
    ``as_of_mono_ns`` (CLOCK_MONOTONIC_COARSE). A reader's coarse clock may lag its real
    elapsed time by one tick, so one tick of drift is added: readers never under-widen."""
    status = _STATUS.get(gb.state, ClockStatus.UNKNOWN)
    bound_s = UNKNOWN_BOUND_S if gb.bound_s is None else gb.bound_s
    if not math.isfinite(bound_s) or bound_s > UNKNOWN_BOUND_S:
        bound_s, status = UNKNOWN_BOUND_S, ClockStatus.UNKNOWN
    drift = gb.drift if math.isfinite(gb.drift) else 0.999
    bound_s += drift * coarse_res_ns / _NS
    return PublishedBound(as_of_mono_ns, math.ceil(bound_s * _NS),
                          min(math.ceil(drift * 1e9), 999_999_999), status)
