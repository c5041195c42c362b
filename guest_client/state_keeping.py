"""The controller's state keeping: facts from the bound, transitions, kernel status, and
when the state may next change without a sample (holdover, bound exceeded).

The rules and the transition table are in :mod:`guest_client.sync_state`; this mixin of
:class:`guest_client.controller.GuestController` feeds them the controller's figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from guest_client.actions import Action, SetKernelStatus
from guest_client.candidates import holdover_after
from guest_client.disruption import DisruptionState
from guest_client.error_bound import BoundBasis, ErrorBound
from guest_client.source import Source
from guest_client.step_policy import JumpState
from guest_client.sync_state import (
    Facts,
    StateEvent,
    StateMachine,
    SyncState,
    kernel_status,
    target,
)
from guest_client.timebase import TimeBase
from timesyncd.discipline import DisciplineConfig


class StateKeeping:
    """Synchronisation state of the guest controller, from its error bound."""

    # shared with GuestController (declared for type checkers; set in its __init__)
    config: DisciplineConfig
    _sources: dict[str, Source]
    _sm: StateMachine
    _basis: BoundBasis | None
    _jumps: JumpState
    _disruption: DisruptionState
    _leap: int
    _est_error_s: float
    _bound_deadline: float | None
    _slope: float
    events: list[StateEvent]
    _tb: TimeBase
    error_bound: Callable[[int], ErrorBound]
    _set_frequency: Callable[[int, float, list[Action]], None]

    @property
    def state(self) -> SyncState:
        return self._sm.state

    @property
    def _last_update_t(self) -> float | None:
        return None if self._basis is None else self._basis.t

    def drain_events(self) -> list[StateEvent]:
        """State transitions since the last call (the daemon logs them)."""
        events, self.events = self.events, []
        return events

    def _facts(self, now_ns: int) -> Facts:
        now = self._tb.t(now_ns)
        bound = self.error_bound(now_ns)
        last = self._last_update_t
        return Facts(
            updated=last is not None, bound_s=bound.bound_s, max_error_s=self.config.max_error_s,
            remaining_s=abs(bound.estimate_s or 0.0),
            max_correction_s=self.config.sync_max_correction_s,
            age_s=now - last + 1e-6 if last is not None else math.inf,  # timer rounding
            holdover_after_s=holdover_after(self._sources.values(), self.config),
            disagreeing=self._jumps.disagreement_s != 0.0, disrupted=self._disruption.active)

    def _evaluate(self, now_ns: int, actions: list[Action], kernel: bool = False) -> None:
        """Move to the state the bound calls for; one kernel status per call, when the state
        changed or ``kernel`` asks for a fresh bound."""
        now = self._tb.t(now_ns)
        facts = self._facts(now_ns)
        new, reason = target(facts)
        growth = self.error_bound(now_ns).growth
        self._bound_deadline = (now + max((facts.max_error_s - facts.bound_s) / growth, 1.0)
                                if growth > 0 and facts.updated else None)
        event = self._sm.move(new, reason, now)
        if event is not None:
            del self.events[:-63]  # bounded for a driver that never drains them
            self.events.append(event)
            if new == SyncState.HOLDOVER:  # keep the learned frequency, stop slewing phase
                self._set_frequency(now_ns, -self._slope, actions)
        if event is not None or kernel:
            actions.append(SetKernelStatus(kernel_status(
                self.state, self._leap, self.config.leap_mode,
                self.error_bound(now_ns).bound_s, self._est_error_s)))

    def _state_deadline(self) -> float | None:
        """When the state may next change without a sample: entering holdover, or the bound
        reaching ``max_error_s`` (re-planned at each evaluation, at least 1 s ahead)."""
        last = self._last_update_t
        if last is None or self.state == SyncState.UNSYNCHRONISED and self._sm.reason in (
                "bound_exceeded", "sources_disagree", "disrupted"):
            return None
        deadlines = [self._bound_deadline] if self._bound_deadline is not None else []
        if self.state != SyncState.HOLDOVER:
            deadlines.append(last + holdover_after(self._sources.values(), self.config))
        return min(deadlines) if deadlines else None
