"""Token schedule and tally: the vectorised counts equal per-token scalar validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.load import BurstyLoad, ConstantLoad, DiurnalLoad, TraceLoad, make_load
from sim.tokens import (
    NS,
    OffsetLookup,
    TokenConfig,
    TokenSchedule,
    jwt_accepts,
    totp_accepts,
    totp_counter,
    x509_accepts,
)

START = 1_735_689_600 * NS


def scalar_tally(sched: TokenSchedule, offset_of) -> dict[str, tuple[int, int, float | None]]:
    """The slow reference: validate every token and its replay one by one."""
    c = sched.config
    out = {}
    for kind, k in sched.kinds.items():
        rejected = accepted = 0
        first = None
        for i in range(len(k.issue_ns)):
            lo, hi, v, r = int(k.lo[i]), int(k.hi[i]), int(k.validate_ns[i]), int(k.replay_ns[i])

            def ok(now: int, lo=lo, hi=hi, kind=kind) -> bool:
                if kind == "jwt":
                    return jwt_accepts(lo, lo, hi, now, c.jwt_leeway_s)
                if kind == "x509":
                    return x509_accepts(lo, hi, now)
                return totp_accepts(lo, now, c.totp_step_s, c.totp_window)

            if ok(v) and not ok(v + offset_of(v)):
                rejected += 1
                first = (v - START) / NS if first is None else first
            if r <= sched.end_ns and not ok(r) and ok(r + offset_of(r)):
                accepted += 1
        out[kind] = (rejected, accepted, first)
    return out


@pytest.mark.parametrize("rate_s_per_day", [-1.3, 0.0, +200.0, -70.0])
def test_vectorised_tally_equals_per_token_validation(rate_s_per_day: float) -> None:
    """Linear drift, both directions, big enough to cross TOTP windows and X.509 notAfter."""
    cfg = TokenConfig(rate_per_s=1 / 30, jwt_lifetime_s=120, x509_lifetime_s=300,
                      x509_backdate_s=5, totp_window=1)
    sched = TokenSchedule(cfg, START, 86_400.0, seed=3)
    times = sched.query_times_ns()

    def offset_of(t: int) -> int:
        return int(rate_s_per_day * (t - START) / 86_400)  # ns, exact integer arithmetic

    lookup = OffsetLookup(times, np.array([offset_of(int(t)) for t in times], dtype=np.int64))
    fast = sched.tally(lookup)
    slow = scalar_tally(sched, offset_of)
    for kind, (rej, acc, first) in slow.items():
        assert (fast[kind].rejected, fast[kind].accepted_expired) == (rej, acc), kind
        assert fast[kind].first_rejection_s == first
    if rate_s_per_day == 0.0:
        assert all(t.rejected == 0 and t.accepted_expired == 0 for t in fast.values())
    if rate_s_per_day < -60:  # far behind: TOTP rejects, replays accepted
        assert fast["totp"].rejected > 0 and fast["jwt"].accepted_expired > 0
    if rate_s_per_day > 0:  # ahead: nothing is "not yet valid", JWTs expire early
        assert fast["jwt"].rejected > 0 and fast["jwt"].accepted_expired == 0


def test_slow_clock_direction() -> None:
    """A clock behind by more than leeway+transit rejects JWTs as not yet valid."""
    cfg = TokenConfig(rate_per_s=1 / 10, jwt_leeway_s=3.0, transit_s=0.02)
    sched = TokenSchedule(cfg, START, 3600.0, seed=1)
    times = sched.query_times_ns()
    for behind, expect in ((-3.0, 0), (-4.05, None)):
        tally = sched.tally(OffsetLookup(times, np.full(len(times), int(behind * NS))))
        if expect == 0:
            assert tally["jwt"].rejected == 0
        else:
            assert tally["jwt"].rejected == tally["jwt"].issued


def test_totp_counter_and_window() -> None:
    c = totp_counter(START + 59 * NS)
    assert totp_accepts(c, START + 59 * NS + 30 * NS)
    assert not totp_accepts(c, START + 90 * NS)
    assert totp_accepts(c, START)  # one step behind
    assert not totp_accepts(c, START - 1)


def test_offset_lookup_refuses_unknown_instants() -> None:
    lookup = OffsetLookup(np.array([1, 5]), np.array([10, 50]))
    assert list(lookup(np.array([5, 1]))) == [50, 10]
    with pytest.raises(KeyError):
        lookup(np.array([3]))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="kind"):
        TokenConfig(kinds=("saml",))
    with pytest.raises(ValueError):
        TokenConfig(replay_after_s=0)


def _numeric_mean(load, t0: float, t1: float) -> float:
    xs = np.linspace(t0, t1, 200_001)
    ys = np.array([load.rps(x) for x in xs])
    return float(np.trapezoid(ys, xs) / (t1 - t0))


@pytest.mark.parametrize("load", [
    ConstantLoad(250.0), DiurnalLoad(),
    BurstyLoad.generate(4, 86_400.0, mean_gap_s=900.0, mean_burst_s=300.0),
    TraceLoad.from_rows([(0, 10), (100, 500), (250, 0)], repeat=True),
])
def test_load_means_are_exact(load) -> None:
    for t0, t1 in ((0.0, 3600.0), (1234.5, 50_000.0), (10.0, 11.0)):
        assert load.mean_rps(t0, t1) == pytest.approx(_numeric_mean(load, t0, t1), rel=2e-3,
                                                      abs=0.5)


def test_csv_trace(tmp_path) -> None:
    p = tmp_path / "trace.csv"
    p.write_text("# recorded\ntime_s,requests_per_second\n0,100\n60,1000\n120,0\n")
    load = make_load(str(p), seed=1, horizon_s=600)
    assert [load.rps(t) for t in (0, 59.9, 60, 119, 500)] == [100, 100, 1000, 1000, 0]
    assert load(60) == 1.0  # utilisation at the default 1000 rps full scale
    assert math.isclose(load.mean_rps(0, 120), 550.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,requests_per_second\n5,1\n")
    with pytest.raises(ValueError, match="time 0"):
        make_load(str(bad), seed=1, horizon_s=10)
    with pytest.raises(ValueError, match="unknown profile"):
        make_load("sawtooth", seed=1, horizon_s=10)
