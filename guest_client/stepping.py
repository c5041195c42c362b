"""Discontinuities, clock jumps and steps: the controller's step handling (sans-IO).

A jump past the step threshold goes to the step policy (:mod:`guest_client.step_policy`:
slew, step or refuse). A step changes the clock's readings, not the controller's times:
those are elapsed time on its :class:`guest_client.timebase.TimeBase`, which only learns
the step's size (as does the ``CorrectionModel``). Mixed into
:class:`guest_client.controller.GuestController`, whose state it shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from guest_client.actions import Action, StepClock
from guest_client.disruption import RESTORE_DETECTED, DisruptionState
from guest_client.error_bound import BoundBasis
from guest_client.source import Source
from guest_client.step_policy import (
    MAX_JUMPS,
    Decision,
    Discontinuity,
    JumpState,
    StepAction,
    counted,
    counts,
    decide,
    evidence,
    operator_step,
)
from guest_client.timebase import TimeBase
from timesyncd.correction import CorrectionModel
from timesyncd.discipline import DisciplineConfig
from timesyncd.filter import FilteredSample

log = logging.getLogger("guest_client.controller")  # one logger for the controller's decisions

_NS = 1_000_000_000


class StepHandling:
    """Jump, discontinuity and step handling of the guest controller."""

    # shared with GuestController (declared for type checkers; set in its __init__)
    config: DisciplineConfig
    _sources: dict[str, Source]
    _model: CorrectionModel
    _jumps: JumpState
    _disruption: DisruptionState
    _last_decision: str
    _verified: bool
    _basis: BoundBasis | None
    _sys: tuple[float, float] | None
    _step_epoch: int
    steps: int
    updates: int
    refused_jumps: int
    _tb: TimeBase
    _estimate: Callable[[int], float | None]
    _use: Callable[[Source, FilteredSample, float], None]
    _update: Callable[[int, list[Action]], None]
    _evaluate: Callable[..., None]

    def on_discontinuity(self, now_ns: int, kind: Discontinuity) -> list[Action]:
        """The guest has reason to believe its clock moved (suspend/restore, reconnect, long
        silence): a later jump may then be stepped once confirmed (step_policy); one already
        being refused now is not explained by it."""
        self._tb.t(now_ns)
        self._jumps.mark(kind, counted(self._sources.values(), self._auth_names()),
                         self._jump_tolerance())
        return []

    def on_disruption(self, now_ns: int, cause: str) -> list[Action]:
        """The clock may have moved (a VMClock marker or generation change, already
        rate-limited by the driver; or a restore detected): disrupted at once (STA_UNSYNC,
        maxerror at its ceiling), old samples dropped, polling sources re-armed in a burst;
        a step follows only as the step policy allows (``Discontinuity.VMCLOCK``)."""
        at = self._tb.base_ns(now_ns)
        if cause != RESTORE_DETECTED:
            self.on_discontinuity(now_ns, Discontinuity.VMCLOCK)
        self._disruption.begin(cause)
        log.warning("clock disrupted (%s): samples dropped, polling in a burst", cause)
        for src in self._sources.values():
            src.forget_samples()
            if src.next_poll is not None:
                src.arm(self.config.burst, at)
        if self._basis is not None:
            self._verified = False
        actions: list[Action] = []
        self._evaluate(now_ns, actions, kernel=True)
        return actions

    def make_step(self, now_ns: int) -> tuple[list[Action], Decision]:
        """An operator accepts the step now (``timesync makestep``; step_policy.operator_step)."""
        pool = counted(self._sources.values(), self._auth_names())
        decision = operator_step(pool, self._jump_tolerance(), self._estimate(now_ns))
        actions: list[Action] = []
        if decision.action == StepAction.STEP:
            now_ns = self._step(now_ns, -decision.size_s, actions)
            self._clear_samples()
            self._jumps.settle(self._sources.values())
            self._disruption.end()
            self._evaluate(now_ns, actions, kernel=True)
        return actions, decision

    def _auth_names(self) -> frozenset[str]:
        """Sources configured as authenticated, answering or not: the one notion the step
        policy and the trust bound share."""
        return frozenset(s.config.name for s in self._sources.values()
                         if s.config.trust == "authenticated")

    def _jump_tolerance(self) -> float:
        return max(self.config.step_threshold_s / 10, 1e-3)

    def _large_jump(self, src: Source, fs: FilteredSample, jump: float,
                    now_ns: int) -> list[Action]:
        """A jump past the step threshold: the step policy says step or refuse."""
        cfg = self.config
        actions: list[Action] = []
        before = self._jumps.jump_before
        if not self._verified and not self._disruption.active and (  # reset + a new large
                before is None or abs(jump - before) > self._jump_tolerance()):  # offset:
            actions += self.on_disruption(now_ns, RESTORE_DETECTED)  # a restore, it seems
        del src.jumps[:-(MAX_JUMPS - 1)]
        src.jumps.append(jump)
        auth = self._auth_names()
        ev = evidence(self._sources.values(), auth, jump, src.config.name in auth,
                      threshold_s=cfg.step_threshold_s, initial=self.updates < cfg.step_limit,
                      confirm_samples=cfg.jump_confirm_samples,
                      tolerance_s=self._jump_tolerance(), discontinuity=self._jumps.discontinuity,
                      jump_before_discontinuity=self._jumps.jump_before)
        decision = decide(ev)
        self._last_decision = f"{decision.action}: {decision.reason}"
        if decision.action != StepAction.STEP:
            self.refused_jumps += 1
            src.status.note = f"refused jump of {jump:+.6f} s: {decision.reason}"
            log.warning("refused clock jump of %+.6f s from %s: %s", jump, src.config.name,
                        decision.reason)
            self._jumps.refused(ev, counts(src.config.name, auth))
            self._evaluate(now_ns, actions)
            return actions
        size = decision.size_s
        now_ns = self._step(now_ns, -size, actions)
        self._clear_samples()
        self._jumps.settle(self._sources.values())
        self._disruption.end()
        src.status.note = f"stepped {size:+.6f} s: {decision.reason}"
        log.warning("stepped the clock by %+.6f s (%s)", -size, decision.reason)
        src.filter.add(fs)
        self._use(src, fs, self._tb.t(now_ns))
        self._update(now_ns, actions)
        return actions

    def _step(self, now_ns: int, delta_s: float, actions: list[Action]) -> int:
        """Step the clock by ``delta_s``; returns the clock reading right after the step.
        Only the time base and the correction record learn of it: every time the controller
        keeps is elapsed time, as far from now after the step as before."""
        delta_ns = round(delta_s * _NS)
        self._model.step(self._tb.clock_s(now_ns), delta_ns / _NS)
        self._tb.step(delta_ns)
        self._step_epoch += 1  # replies to requests sent before it measured across it
        self.steps += 1
        actions.append(StepClock(delta_ns))
        log.warning("stepped the clock by %+.9f s", delta_ns / _NS)
        return now_ns + delta_ns

    def _clear_samples(self) -> None:
        for src in self._sources.values():
            src.forget_samples()
        self._sys = None
