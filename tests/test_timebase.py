"""A clock step changes the clock's readings, not elapsed time: every time the controller
keeps (next polls, the slew's end, the state deadlines, the last update, holdover since)
stays as far from now after a step as before it (guest_client.timebase; issue 9)."""

from __future__ import annotations

import copy

import pytest
from support.sim_guest import LAN, make_guest

from guest_client.actions import Action, SetKernelStatus, StepClock
from guest_client.controller import GuestController
from guest_client.timebase import TimeBase
from sim.engine import Upstream

_NS = 1_000_000_000


def test_time_base_is_continuous_across_a_step() -> None:
    tb = TimeBase()
    assert tb.t(5_000_000_000) == 0.0  # the first reading is the epoch
    assert tb.t(7_500_000_000) == 2.5
    tb.step(-3 * _NS)  # the clock read 7.5 s, now reads 4.5 s: no time passed
    assert tb.t(4_500_000_000) == 2.5 and tb.base_ns(4_500_000_000) == 2_500_000_000
    assert tb.reading_of(2.5) == 4_500_000_000  # back to what the clock reads today
    assert tb.clock_s(4_500_000_000) == -0.5  # the correction model's scale moved with it


def _step(ctl: GuestController, now_ns: int, delta_s: float) -> int:
    actions: list[Action] = []
    after = ctl._step(now_ns, delta_s, actions)  # the step alone, nothing else it implies
    assert [type(a) for a in actions] == [StepClock]
    return after


def _same_but_delta(a: GuestController, b: GuestController, now_a: int, delta_ns: int) -> None:
    """``b`` (stepped by ``delta_ns`` in all) at reading ``now_a + delta_ns`` says what
    ``a`` (never stepped) says at ``now_a``, its clock readings ``delta_ns`` later. (Not the
    bound: it holds the estimated offset, which a step moves by its size.)"""
    sa, sb = a.status(now_a), b.status(now_a + delta_ns)
    assert (sb.state, sb.state_reason) == (sa.state, sa.state_reason)
    assert sb.holdover_s == sa.holdover_s and sb.root_distance_s == sa.root_distance_s
    for name in ("last_update", "holdover_since"):
        va, vb = getattr(sa, name), getattr(sb, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            assert vb - va == pytest.approx(delta_ns / _NS, abs=1e-6), name
    na, nb = a.next_timer_ns(), b.next_timer_ns()
    assert na is not None and nb == na + delta_ns


def _what(actions: list[Action]) -> list[object]:
    """Actions, with kernel status reduced to its flags (maxerror is the bound: see above)."""
    return [(type(x), x.status.synchronised, x.status.leap) if isinstance(x, SetKernelStatus)
            else x for x in actions]


def test_a_step_leaves_every_kept_time_at_the_same_elapsed_distance() -> None:
    """Two copies of a controller mid-slew, one stepped twice (once mid-slew with a poll, the
    slew's end and the state deadlines pending; once in holdover): from then on it wakes at
    the same elapsed times (its readings exactly the steps later), does the same things
    there, and reports the same ages, state and holdover duration. The thresholds are wide
    so the steps' sizes alone do not change the state the offset calls for."""
    engine, clock, ctl = make_guest([Upstream("a", LAN)], offset_s=0.2, ppm=50.0, minpoll=4,
                                    maxpoll=4, max_error_s=10.0, sync_max_correction_s=5.0)
    engine.run(1.0)  # one update in: its 200 ms slew runs, the next poll is in the burst
    now = clock.now_ns()
    assert ctl._slew_end_t is not None and ctl._bound_deadline is not None
    assert ctl._basis is not None and ctl._sources["a"].next_poll is not None
    plain, stepped = ctl, copy.deepcopy(ctl)  # from here on driven by hand: no replies
    _same_but_delta(plain, stepped, now, 0)
    delta = _step(stepped, now, 2.5) - now  # mid-slew, a poll and the deadlines pending
    wakes: list[str] = []
    for _ in range(40):
        _same_but_delta(plain, stepped, now, delta)
        na = plain.next_timer_ns()
        assert na is not None
        if plain.state == "holdover" and stepped.steps == 1:  # the second step: in holdover
            delta = _step(stepped, now + delta, -1.25) - now
            _same_but_delta(plain, stepped, now, delta)
            wakes.append("step in holdover")
        now = na
        acts = plain.on_timer(now)
        assert _what(stepped.on_timer(now + delta)) == _what(acts)  # same requests (cookies)
        wakes += [type(x).__name__ for x in acts]
    _same_but_delta(plain, stepped, now, delta)
    assert stepped.steps == 2 and delta == round(2.5 * _NS) + round(-1.25 * _NS)
    # what the run went through: polls, the slew's end, holdover entered, then held
    assert {"SendRequest", "SetFrequency", "SetKernelStatus", "step in holdover"} <= set(wakes)
    assert plain.state == "holdover" and plain.status(now).holdover_s > 300
