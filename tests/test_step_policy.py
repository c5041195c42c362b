"""The step policy's table (docs/SECURITY.md, "Step policy"), the state rule and transition
table, and the error bound's arithmetic: pure functions, checked row by row."""

from __future__ import annotations

from dataclasses import replace

import pytest

from guest_client.error_bound import MAX_BOUND_S, BoundBasis, compute, root_distance
from guest_client.step_policy import Decision, Discontinuity, Evidence, StepAction, decide
from guest_client.sync_state import (
    TRANSITIONS,
    Facts,
    Reason,
    StateMachine,
    SyncState,
    kernel_status,
    target,
)

HOST = Evidence(jump_s=2.0, threshold_s=1.0, initial=False, authenticated_mode=False,
                from_authenticated=False, agreeing=3, confirm_samples=3, sources_confirming=1,
                sources_usable=1, all_authenticated_confirm=False, discontinuity=None,
                predates_discontinuity=False)
AUTH = replace(HOST, authenticated_mode=True, from_authenticated=True,
               all_authenticated_confirm=True)


def act(ev: Evidence) -> StepAction:
    d = decide(ev)
    assert isinstance(d, Decision) and d.reason
    return d.action


@pytest.mark.parametrize("name,ev,expected", [
    ("small jump slews", replace(HOST, jump_s=0.5), StepAction.SLEW),
    ("host boot steps at once", replace(HOST, initial=True, agreeing=1), StepAction.STEP),
    ("host, agreement alone", HOST, StepAction.REFUSE),
    ("host, suspend observed", replace(HOST, discontinuity=Discontinuity.SUSPEND),
     StepAction.STEP),
    ("host, reconnect", replace(HOST, discontinuity=Discontinuity.RECONNECT), StepAction.STEP),
    ("host, reconnect after the jump", replace(
        HOST, discontinuity=Discontinuity.RECONNECT, predates_discontinuity=True),
     StepAction.REFUSE),
    ("host, too few samples", replace(HOST, discontinuity=Discontinuity.OUTAGE, agreeing=2),
     StepAction.REFUSE),
    ("host, one of several sources", replace(
        HOST, discontinuity=Discontinuity.SUSPEND, sources_usable=3), StepAction.REFUSE),
    ("auth, confirmed by authenticated", AUTH, StepAction.STEP),
    ("auth, host source never", replace(AUTH, from_authenticated=False, initial=True,
                                        discontinuity=Discontinuity.SUSPEND),
     StepAction.REFUSE),
    ("auth, boot from a single sample", replace(AUTH, initial=True, agreeing=1),
     StepAction.REFUSE),
    ("auth, not every authenticated source", replace(AUTH, all_authenticated_confirm=False,
                                                     discontinuity=Discontinuity.RECONNECT),
     StepAction.REFUSE),
])
def test_decide_table(name: str, ev: Evidence, expected: StepAction) -> None:
    assert act(ev) == expected, name


def test_step_size_is_the_jump() -> None:
    assert decide(AUTH).size_s == 2.0
    assert decide(replace(HOST, jump_s=-3.0, initial=True)).size_s == -3.0


FACTS = Facts(updated=True, bound_s=1e-3, max_error_s=1.0, remaining_s=1e-4,
              max_correction_s=0.01, age_s=10.0, holdover_after_s=128.0, disagreeing=False)


@pytest.mark.parametrize("facts,state,reason", [
    (FACTS, SyncState.SYNCHRONISED, Reason.TRACKING),
    (replace(FACTS, updated=False), SyncState.UNSYNCHRONISED, Reason.STARTING),
    (replace(FACTS, remaining_s=0.2), SyncState.UNSYNCHRONISED, Reason.CORRECTING),
    (replace(FACTS, age_s=200.0), SyncState.HOLDOVER, Reason.NO_RECENT_UPDATE),
    (replace(FACTS, age_s=200.0, bound_s=1.0), SyncState.UNSYNCHRONISED, Reason.BOUND_EXCEEDED),
    (replace(FACTS, disagreeing=True), SyncState.UNSYNCHRONISED, Reason.SOURCES_DISAGREE),
])
def test_state_rule(facts: Facts, state: SyncState, reason: Reason) -> None:
    assert target(facts) == (state, reason)


def test_transitions_emit_named_events_once() -> None:
    sm = StateMachine()
    assert sm.move(SyncState.UNSYNCHRONISED, Reason.CORRECTING, 1.0) is None
    ev = sm.move(SyncState.SYNCHRONISED, Reason.TRACKING, 2.0)
    assert ev is not None and ev.name == "synchronised" and sm.since == 2.0
    assert sm.move(SyncState.SYNCHRONISED, Reason.TRACKING, 3.0) is None
    ev = sm.move(SyncState.HOLDOVER, Reason.NO_RECENT_UPDATE, 4.0)
    assert ev is not None and ev.name == "holdover_entered" and sm.since == 4.0
    # every pair of distinct states has a named transition
    assert len(TRANSITIONS) == 6 and all(a != b for a, b in TRANSITIONS)


def test_kernel_status_reads_the_bound() -> None:
    ks = kernel_status(SyncState.HOLDOVER, 1, "kernel", 0.25, 1e-5)
    assert not ks.synchronised and ks.maxerror_s == 0.25 and ks.leap == 0
    ks = kernel_status(SyncState.SYNCHRONISED, 1, "kernel", 1e-3, 1e-2)
    assert ks.synchronised and ks.esterror_s == 1e-3 and ks.leap == 1


def test_error_bound_adds_every_term() -> None:
    basis = BoundBasis(t=100.0, distance_s=3e-4, freq_sd=2e-6)
    b = compute(basis, 110.0, 5_000_000_000, estimate_s=-2e-3, allowance_ppm=10.0,
                disagreement_s=-2.0, verified=False)
    assert b.bound_s == pytest.approx(2e-3 + 3e-4 + 12e-6 * 10 + 2.0)
    assert b.growth_ppm == pytest.approx(12.0) and not b.verified
    assert b.at(6_000_000_000) == pytest.approx(b.bound_s + 12e-6)
    assert b.at(10**20) == MAX_BOUND_S
    none = compute(None, 0.0, 0, None, 10.0)
    assert none.bound_s == MAX_BOUND_S and none.estimate_s is None
    # chrony's root distance: no remaining offset, no disagreement
    assert root_distance(basis, 110.0, 1.0) == pytest.approx(3e-4 + 3e-6 * 10)
