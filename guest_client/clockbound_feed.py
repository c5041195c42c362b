"""What the guest publishes in the ClockBound segment, from what the controller knows.

:func:`guest_bound` is the one adapter from the controller to a bound around the clock
reading; everything downstream (:func:`published_bound`, the writer) only sees its
:class:`GuestBound`. The controller's :class:`~guest_client.error_bound.ErrorBound` already
is that bound (remaining uncorrected offset, the slew in progress included, plus the
selection distance, growing at the frequency-error allowance plus the frequency estimate's
uncertainty), so the adapter only maps the state. A link loss alone does not change the
published status: the bound keeps growing at its rate, which is what makes it hold without
samples. A disruption (a VMClock marker or generation change, or a restore detected from a
link reset and a large consistent offset) publishes no bound, status Disrupted when VMClock
said so and Unknown when the restore was only inferred, until a sample confirms the clock or
the step policy steps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from guest_client.clockbound_writer import UNKNOWN_BOUND_NS, PublishedBound
from guest_client.controller import GuestController
from guest_client.disruption import RESTORE_DETECTED
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
    disrupted: bool = False  # VMClock disruption or restore: status Disrupted until confirmed


def guest_bound(controller: GuestController, now_ns: int) -> GuestBound:
    """The bound around the clock reading ``now_ns`` (see the module doc)."""
    eb = controller.error_bound(now_ns)
    allowance = controller.config.max_clock_error_ppm * 1e-6
    drift = max(allowance, eb.growth)
    if controller.state == "unsynchronised" and controller.disruption.active:
        # VMClock said so: Disrupted; a restore only inferred (no VMClock): Unknown
        vmclock = controller.disruption.cause != RESTORE_DETECTED
        return GuestBound(str(controller.state), None, drift, disrupted=vmclock)
    if eb.estimate_s is None:
        return GuestBound(str(controller.state), None, drift)
    return GuestBound(str(controller.state), eb.at(now_ns), drift)


def published_bound(gb: GuestBound, as_of_mono_ns: int, coarse_res_ns: int,
                    disruption_marker: int | None = None) -> PublishedBound:
    """The segment's fields for ``gb``, computed at a clock reading taken right after
    ``as_of_mono_ns`` (CLOCK_MONOTONIC_COARSE); with VMClock, its ``disruption_marker`` is
    copied (disruption support on). A reader's coarse clock may lag its real
    elapsed time by one tick, so one tick of drift is added: readers never under-widen."""
    status = ClockStatus.DISRUPTED if gb.disrupted else _STATUS.get(gb.state,
                                                                      ClockStatus.UNKNOWN)
    bound_s = UNKNOWN_BOUND_S if gb.bound_s is None else gb.bound_s
    if not math.isfinite(bound_s) or bound_s > UNKNOWN_BOUND_S:
        bound_s = UNKNOWN_BOUND_S
        status = ClockStatus.DISRUPTED if gb.disrupted else ClockStatus.UNKNOWN
    drift = gb.drift if math.isfinite(gb.drift) else 0.999
    bound_s += drift * coarse_res_ns / _NS
    return PublishedBound(as_of_mono_ns, math.ceil(bound_s * _NS),
                          min(math.ceil(drift * 1e9), 999_999_999), status,
                          disruption_marker or 0, disruption_marker is not None)
