"""The guest's synchronisation state: one enum, one rule, one transition table. Sans-IO.

The state is derived from the error bound and its age, never from the link: a relay that
restarts for a few seconds does not flip a guest whose last sample is fresh. ``target``
says which state the facts call for and why; :class:`StateMachine` moves to it through
``TRANSITIONS`` (each allowed move names the event it emits), so the controller, the
health report and the CLI share the same names and the daemon logs events instead of
diffing status objects.

``synchronised`` means: the bound is below ``max_error_s`` and the correction still to apply
is below ``sync_max_correction_s`` (a guest 200 ms off mid-slew is not synchronised; one
tracking within its noise is), with a clock update in the last ``holdover_polls`` polls.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from timesyncd.clock import KernelStatus
from timesyncd.packet import Leap
from timesyncd.reasons import StateReason


class SyncState(StrEnum):
    UNSYNCHRONISED = "unsynchronised"
    SYNCHRONISED = "synchronised"
    HOLDOVER = "holdover"


#: the state reasons live in the registry (timesyncd.reasons); this name stays for callers
Reason = StateReason


_U, _S, _H = SyncState.UNSYNCHRONISED, SyncState.SYNCHRONISED, SyncState.HOLDOVER
#: Allowed moves and the event each emits.
TRANSITIONS: dict[tuple[SyncState, SyncState], str] = {
    (_U, _S): "synchronised",
    (_U, _H): "holdover_entered",  # e.g. silenced while still slewing a start-up offset
    (_S, _H): "holdover_entered",
    (_S, _U): "synchronisation_lost",
    (_H, _S): "resynchronised",
    (_H, _U): "holdover_expired",
}


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rule needs, all from the controller's current numbers."""

    updated: bool  # at least one clock update happened
    bound_s: float
    max_error_s: float
    remaining_s: float  # |estimated offset still to correct|
    max_correction_s: float
    age_s: float  # since the last clock update
    holdover_after_s: float
    disagreeing: bool
    disrupted: bool = False  # guest_client.disruption


def target(f: Facts) -> tuple[SyncState, Reason]:
    """The state the facts call for, and why. Order matters: the worst explanation wins."""
    if f.disrupted:
        return _U, Reason.DISRUPTED
    if not f.updated:
        return _U, Reason.STARTING
    if f.disagreeing:
        return _U, Reason.SOURCES_DISAGREE
    if f.bound_s >= f.max_error_s:
        return _U, Reason.BOUND_EXCEEDED
    if f.age_s >= f.holdover_after_s:
        return _H, Reason.NO_RECENT_UPDATE
    if f.remaining_s > f.max_correction_s:
        return _U, Reason.CORRECTING
    return _S, Reason.TRACKING


@dataclass(frozen=True, slots=True)
class StateEvent:
    """A transition: ``name`` from ``TRANSITIONS``, at controller (elapsed) seconds ``t``."""

    name: str
    old: SyncState
    new: SyncState
    reason: Reason
    t: float


class StateMachine:
    """Holds the state, its reason and since when; ``move`` returns the event, if any."""

    def __init__(self) -> None:
        self.state = _U
        self.reason = Reason.STARTING
        self.since: float | None = None  # controller seconds of entering ``state``

    def move(self, new: SyncState, reason: Reason, t: float) -> StateEvent | None:
        self.reason = reason
        if new == self.state:
            return None
        name = TRANSITIONS.get((self.state, new))
        if name is None:  # unreachable with the table above; refuse loudly in tests
            raise ValueError(f"no transition {self.state} -> {new}")
        event = StateEvent(name, self.state, new, reason, t)
        self.state = new
        self.since = t
        return event


def kernel_status(state: SyncState, leap: int, leap_mode: str, bound_s: float,
                  est_error_s: float) -> KernelStatus:
    """What the kernel is told: STA_UNSYNC unless synchronised, maxerror the error bound;
    a leap warning only while synchronised and passed on (``leap_mode`` kernel)."""
    synced = state == SyncState.SYNCHRONISED
    flag = Leap(leap) if leap_mode == "kernel" and synced and leap in (1, 2) else Leap.NONE
    return KernelStatus(synchronised=synced, maxerror_s=bound_s,
                        esterror_s=min(est_error_s, bound_s), leap=flag)
