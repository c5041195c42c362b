"""Trust bounds and authenticated jump confirmation: the pure rule and the controller using it.

Controller runs use the simulator engine (virtual time, no real clock): an "nts" source with
trust "authenticated" (the host cannot forge it) next to a "host" source it can.
"""

from __future__ import annotations

import random

from guest_client.controller import GuestController, SourceConfig
from sim.clock import SimClock
from sim.engine import Engine, Upstream
from sim.network import Hop, Network
from sim.oscillator import Oscillator
from timesyncd.discipline import DisciplineConfig
from timesyncd.selection import Candidate
from timesyncd.trust import (
    NO_AUTHENTICATED_BOUND,
    OUTSIDE_AUTHENTICATED_BOUNDS,
    bound_by_authenticated,
)

START = 1_735_689_600 * 1_000_000_000
LAN = Network(upstream=Hop(base_s=100e-6, jitter_s=50e-6))
DEAD = Network(upstream=Hop(loss=1.0))


def test_bound_rule() -> None:
    a = Candidate("a", 0.010, 0.0, 0.002)
    b = Candidate("b", 0.011, 0.0, 0.003)
    inside = Candidate("h1", 0.0095, 0.0, 0.5)
    outside = Candidate("h2", 0.05, 0.0, 0.0001)
    assert bound_by_authenticated([a, inside, outside], ()).kept == (a, inside, outside)
    tb = bound_by_authenticated([a, b, inside, outside], {"a", "b"})
    assert tb.kept == (a, b, inside)
    assert tb.rejected == {"h2": OUTSIDE_AUTHENTICATED_BOUNDS}
    assert (tb.low, tb.high) == (0.010 - 0.002 + 0.0, min(0.012, 0.014))
    # authenticated configured but absent now: host candidates are not used at all
    tb = bound_by_authenticated([inside, outside], {"a"})
    assert tb.kept == () and set(tb.rejected.values()) == {NO_AUTHENTICATED_BOUND}


def make(upstreams: list[Upstream], seed: int = 3, **cfg: object
         ) -> tuple[Engine, SimClock, GuestController]:
    rng = random.Random(seed)
    clock = SimClock(Oscillator(-11.6, 1e-3, random.Random(rng.getrandbits(32))),
                     start_unix_ns=START)
    ctl = GuestController(DisciplineConfig(**cfg), random.Random(rng.getrandbits(32)),  # type: ignore[arg-type]
                          [SourceConfig("nts", "authenticated"), SourceConfig("host")])
    engine = Engine(ctl, clock, upstreams, random.Random(rng.getrandbits(32)))
    return engine, clock, ctl


def source(ctl: GuestController, clock: SimClock, name: str) -> object:
    return next(s for s in ctl.status(clock.now_ns()).sources if s.name == name)


def test_host_source_outside_authenticated_bounds_is_not_used() -> None:
    """The host offsets its source by 50 ms (below the step threshold, so the jump guard
    would let it slew in): the authenticated interval keeps it out."""
    engine, clock, ctl = make([Upstream("nts", LAN), Upstream("host", LAN, error_s=0.05)])
    engine.run(900.0)
    assert abs(clock.offset_s()) < 1e-3
    host = source(ctl, clock, "host")
    assert host.rejected[OUTSIDE_AUTHENTICATED_BOUNDS] > 10  # type: ignore[attr-defined]
    assert not host.selected and "outside the bounds" in host.note  # type: ignore[attr-defined]
    assert source(ctl, clock, "nts").selected  # type: ignore[attr-defined]


def test_blocking_nts_does_not_downgrade_to_host_time() -> None:
    """The host drops all NTS traffic and serves its own time: never used."""
    engine, clock, ctl = make([Upstream("nts", DEAD), Upstream("host", LAN, error_s=3.0)])
    engine.run(600.0)
    st = ctl.status(clock.now_ns())
    assert st.state == "unsynchronised" and ctl.steps == 0 and clock.steps == []
    assert source(ctl, clock, "host").rejected[NO_AUTHENTICATED_BOUND] > 0  # type: ignore[attr-defined]


def test_restored_snapshot_confirmed_by_authenticated_source_is_stepped_once() -> None:
    """The guest's clock jumps by 7 s (a restored snapshot, no relay reconnect): both sources
    see it, the authenticated one confirms it, the clock is stepped back once, reported."""
    engine, clock, ctl = make([Upstream("nts", LAN), Upstream("host", LAN)],
                              jump_confirm_samples=3)
    engine.run(600.0)
    steps_before = ctl.steps
    engine.call_at(610.0, lambda e: clock.step(7 * 1_000_000_000))
    engine.run(1500.0)
    assert ctl.steps == steps_before + 1 and ctl.refused_jumps >= 1
    assert abs(clock.offset_s()) < 1e-3


def test_host_only_jump_is_refused_with_authenticated_source_present() -> None:
    lie = {"on": False}
    host = Upstream("host", LAN, error_s=lambda t: 30.0 if lie["on"] else 0.0)
    engine, clock, ctl = make([Upstream("nts", LAN), host])
    engine.run(600.0)
    steps_before = ctl.steps
    lie["on"] = True
    engine.run(2000.0)
    assert ctl.steps == steps_before and abs(clock.offset_s()) < 1e-3
    assert ctl.refused_jumps > 0


def test_confirmed_step_back_holds_at_fast_polls() -> None:
    """Regression: right after a backward step the clock reading could round just below the
    step's segment in the correction model, which then reported the pre-step correction: the
    controller slewed at its limit and later stepped the 30 s back in. Seeds that hit it."""
    for seed in (4, 6, 12, 16, 19, 25):
        shift = {"on": False}
        host = Upstream("host", LAN, error_s=lambda t, s=shift: 0.05 if s["on"] else 0.0)
        engine, clock, ctl = make([Upstream("nts", LAN), host], seed=seed,
                                  jump_confirm_samples=3, minpoll=-2, maxpoll=-2, burst=2,
                                  step_limit=2)
        engine.run(5.0)
        shift["on"] = True
        engine.run(8.0 + seed * 0.1)
        engine.call_at(8.5 + seed * 0.1, lambda e, c=clock: c.step(30 * 1_000_000_000))
        engine.run(20.0)
        assert len(clock.steps) == 2, (seed, clock.steps)
        assert abs(clock.offset_s()) < 1e-3, seed


def test_dropping_the_link_that_carries_nts_does_not_let_a_host_source_step() -> None:
    """The host drops the relay link (the NTS source rides on it; a direct udp: source does
    not) and makes its own source jump by 10 s: the guest-side discontinuity that a drop
    causes must not confirm a jump while an authenticated source is configured."""
    lie = {"on": False}
    host = Upstream("host", LAN, error_s=lambda t: 10.0 if lie["on"] else 0.0)
    engine, clock, ctl = make([Upstream("nts", LAN), host], jump_confirm_samples=3)
    engine.run(600.0)
    steps_before = ctl.steps

    def attack(e: Engine) -> None:
        e._apply(ctl.on_connection_lost(clock.now_ns(), sources=["nts"]))
        lie["on"] = True

    engine.call_at(600.5, attack)
    engine.run(2000.0)
    assert ctl.steps == steps_before and clock.steps == []
    assert abs(clock.offset_s()) < 1e-3
    assert ctl.refused_jumps >= 3
