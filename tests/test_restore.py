"""Issue 15: a snapshot restore in the simulator (the real controller, a SimClock that resumes
behind by the pause), with and without VMClock; the step policy's VMClock rows; the disrupted
state in the kernel status, ClockBound feed and health report."""

from __future__ import annotations

import json

import pytest

from guest_client.clockbound_feed import guest_bound, published_bound
from guest_client.controller import SourceConfig
from guest_client.disruption import RESTORE_DETECTED, VMCLOCK_MARKER
from sim.engine import Engine, Upstream
from tests.test_honest_guest import LAN, Watch, make
from timesyncd.clockbound import ClockStatus
from timesyncd.health import HealthReport, parse_health

PAUSE_S = 7200.0
AT_S = 600.0


def restore(engine: Engine, vmclock: bool) -> None:
    def marker(e: Engine) -> None:
        e._apply(e.controller.on_disruption(e.clock.now_ns(), VMCLOCK_MARKER))

    engine.pause(AT_S, PAUSE_S, marker if vmclock else None)


@pytest.mark.parametrize("vmclock", [False, True])
def test_restore_is_detected_and_stepped_once_when_confirmed(vmclock: bool) -> None:
    """Two hours paused: the guest resumes 2 h behind; it is disrupted at once (VMClock) or at
    the first sample after the transport reset (none), says so to the kernel (STA_UNSYNC,
    maxerror at its ceiling) and ClockBound (Disrupted / Unknown), steps once when the
    sources confirm it, and tokens (60 s leeway) are valid again within 10 s of resume."""
    engine, clock, ctl = make([Upstream("a", LAN), Upstream("b", LAN)])
    restore(engine, vmclock)
    watch = Watch(engine, clock, ctl)
    watch.run(AT_S, 1.0)
    assert ctl.state == "synchronised" and not clock.steps
    seen: list[tuple[float, str, str, bool, float, ClockStatus]] = []

    def record(e: Engine, _actions: object) -> None:
        if e.now_s < AT_S + PAUSE_S:
            return
        st = ctl.status(clock.now_ns())
        ks = clock.kernel_status
        pb = published_bound(guest_bound(ctl, clock.now_ns()), 0, 0)
        seen.append((e.now_s - AT_S - PAUSE_S, st.state_reason, st.step_decision,
                     ks.synchronised, ks.maxerror_s, pb.status))

    engine.on_actions = record
    engine.run(AT_S + PAUSE_S + 60)
    disrupted = [r for r in seen if r[1] == "disrupted"]
    assert disrupted, "the restore was never noticed"
    assert all(not r[3] and r[4] >= 16.0 for r in disrupted)  # kernel told: no bound
    expect = ClockStatus.DISRUPTED if vmclock else ClockStatus.UNKNOWN
    assert {r[5] for r in disrupted} == {expect}
    assert ctl.disruption.cause == (VMCLOCK_MARKER if vmclock else RESTORE_DETECTED)
    assert len(clock.steps) == 1 and abs(clock.steps[0][1] / 1e9 - PAUSE_S) < 1.0
    assert "confirmed after a" in seen[-1][2]
    valid_after = max(r[0] for r in seen if r[1] == "disrupted")  # stepped right after
    assert valid_after < 10.0, valid_after
    assert abs(clock.offset_s()) < 0.01
    watch.run(AT_S + PAUSE_S + 300, 1.0)
    assert watch.uncovered(AT_S + PAUSE_S + 60) == []
    assert ctl.state == "synchronised"


def test_marker_alone_steps_nothing_and_clears_on_agreeing_samples() -> None:
    """A marker change (the host's word) while the clock did not move: disrupted, samples
    dropped, a burst; the first agreeing sample clears it; no step."""
    engine, clock, ctl = make([Upstream("a", LAN)])
    engine.call_at(300.0, lambda e: e._apply(e.controller.on_disruption(e.clock.now_ns(),
                                                                         VMCLOCK_MARKER)))
    engine.run(299.9)
    assert ctl.state == "synchronised"
    sent = engine.packets_sent
    engine.run(300.0)
    assert ctl.status(clock.now_ns()).state_reason == "disrupted"
    engine.run(320.0)
    assert engine.packets_sent - sent >= 3  # a burst, not one poll a minute
    assert not clock.steps and not ctl.disruption.active
    engine.run(400.0)
    assert ctl.state == "synchronised"


def test_authenticated_mode_marker_never_steps_on_host_sources() -> None:
    """With an authenticated source configured, a VMClock marker plus host sources reporting
    a 2 h jump is no step: only the authenticated source could confirm it, and it is silent
    (NTS-KE pending after the restore)."""
    engine, clock, ctl = make([Upstream("h1", LAN), Upstream("h2", LAN), Upstream("nts", LAN)],
                              sources=[SourceConfig("nts", "authenticated")])

    def marker_and_nts_silent(e: Engine) -> None:
        del e.upstreams["nts"]
        e._apply(e.controller.on_disruption(e.clock.now_ns(), VMCLOCK_MARKER))

    engine.pause(AT_S, PAUSE_S, marker_and_nts_silent)
    engine.run(AT_S)
    assert ctl.state == "synchronised"
    engine.run(AT_S + PAUSE_S + 120)
    assert not clock.steps
    assert ctl.state == "unsynchronised"
    assert "only authenticated sources may confirm" in ctl.status(clock.now_ns()).step_decision


def test_health_report_carries_the_disrupted_state_old_and_new_relays() -> None:
    engine, clock, ctl = make([Upstream("a", LAN)])
    engine.run(100.0)
    ctl.on_disruption(clock.now_ns(), VMCLOCK_MARKER)
    report = HealthReport.from_status(ctl.status(clock.now_ns()).to_json())
    payload = json.dumps(report.to_json()).encode()
    parsed = parse_health(payload)
    assert (parsed.state, parsed.state_reason, parsed.disrupted, parsed.disruptions) == (
        "unsynchronised", "disrupted", True, 1)
    # an old relay (its reason list without "disrupted", unknown keys ignored) accepts it
    import timesyncd.health as health

    old_reasons = tuple(r for r in health.REASONS if r != "disrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(health, "REASONS", old_reasons)
        assert parse_health(payload).state_reason == "other"
    # an old guest's report (no new fields) still parses
    old = {k: v for k, v in report.to_json().items() if k not in ("disrupted", "disruptions")}
    assert parse_health(json.dumps(old).encode()).disrupted is None


@pytest.mark.parametrize("vmclock", ["--vmclock", "--no-vmclock"])
def test_drift_sim_snapshot_restore_scenario(vmclock: str) -> None:
    """The scenario as users run it (default 2 h pause at 1 h): none never recovers, step at
    its next 300 s step, discipline within seconds with one step; the bound holds."""
    from click.testing import CliRunner

    from timesyncd.cli import main

    res = CliRunner().invoke(main, ["drift-sim", "--scenario", "snapshot-restore", vmclock,
                                    "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    s = doc["strategies"]
    assert doc["pause_s"] == 7200.0 and doc["vmclock"] == (vmclock == "--vmclock")
    assert not s["none"]["recovered"] and s["step"]["failing_for_s"] == 300.0
    assert s["discipline"]["failing_for_s"] < 10.0 and s["discipline"]["steps"] == 1
    # without VMClock the guest cannot know before the first reply (milliseconds here): the
    # samples taken in between are the only ones whose claimed bound misses the truth
    assert s["discipline"]["bound_coverage"] >= (1.0 if vmclock == "--vmclock" else 0.999)
    assert any(st["reason"] == "disrupted" for st in s["discipline"]["states"])
    bad = CliRunner().invoke(main, ["drift-sim", "--pause", "5m"])
    assert bad.exit_code == 2 and "--pause not used" in bad.output


def test_status_text_says_why_it_stepped_and_shows_vmclock() -> None:
    from timesyncd.status_report import StatusReport
    from timesyncd.status_view import format_tracking

    engine, clock, ctl = make([Upstream("a", LAN), Upstream("b", LAN)])
    restore(engine, vmclock=True)
    engine.run(AT_S + PAUSE_S + 30)
    st = ctl.status(clock.now_ns()).to_json()
    st["vmclock"] = {"clock_status": "synchronized", "leap_indicator": "none", "resets": 1,
                     "rate_limited": 0, "vm_generation": 3}
    text = "\n".join(format_tracking(StatusReport.from_json(st), clock.now_ns() / 1e9))
    assert "Step decision   : step: confirmed after a reconnect" in text
    assert "VMClock         : synchronized, leap none; 1 disruptions acted on" in text


def test_drift_sim_snapshot_restore_seeds_runs_each_seed_and_summarises() -> None:
    """``--seeds`` runs every seed (each as its own ``--seed`` run would) and adds the median
    and worst over them, in JSON and text; a single seed prints no summary."""
    from click.testing import CliRunner

    from timesyncd.cli import main

    args = ["drift-sim", "--scenario", "snapshot-restore", "--pause", "20m", "--pause-at", "15m"]
    multi = CliRunner().invoke(main, [*args, "--seeds", "1-2", "--json"])
    assert multi.exit_code == 0, multi.output
    doc = json.loads(multi.stdout)
    assert list(doc["seeds"]) == ["1", "2"]
    single = json.loads(CliRunner().invoke(main, [*args, "--seed", "2", "--json"]).stdout)
    assert doc["seeds"]["2"] == single and single["seed"] == 2
    runs = [doc["seeds"][k]["strategies"] for k in ("1", "2")]
    assert runs[0]["discipline"]["final_offset_s"] != runs[1]["discipline"]["final_offset_s"]
    s = doc["summary"]
    assert s["none"]["recovered"] == 0 and s["none"]["failing_for_s"]["worst"] is None
    # paused at 900 s of uptime: the 300 s step timer still has 300 s to run after resume
    assert s["step"]["failing_for_s"] == {"median": 300.0, "worst": 300.0}
    fails = [r["discipline"]["failing_for_s"] for r in runs]
    assert s["discipline"]["failing_for_s"]["worst"] == max(fails) < 10.0
    assert s["discipline"]["recovered"] == 2 and s["discipline"]["steps"]["worst"] == 1

    text = CliRunner().invoke(main, [*args, "--seeds", "1-2"]).output
    assert "watched 1800 s after resume, seed 1" in text and ", seed 2" in text
    assert "summary over 2 seeds (median / worst)" in text
    table = text[text.index("summary over"):]
    assert "0 of 2 seeds" in next(x for x in table.splitlines() if x.startswith("  none "))
    one = CliRunner().invoke(main, [*args, "--seed", "2"]).output
    assert "summary" not in one and ", seed" not in one


def test_restore_summary_takes_median_and_worst_and_never_recovered_as_worst() -> None:
    from sim.restore import format_restore_summary, restore_summary

    def run(failing: float | None, failed: int, coverage: float | None) -> dict[str, object]:
        disc = {"failing_for_s": failing, "tokens_failed": failed,
                "recovered": failing is not None, "steps": 1, "bound_coverage": coverage,
                "samples_without_bound": 3}
        return {"strategies": {"discipline": disc}}

    docs = {1: run(2.0, 0, 1.0), 2: run(4.0, 1, 0.98), 3: run(None, 30, None)}
    s = restore_summary(docs)["discipline"]
    assert s["failing_for_s"] == {"median": 4.0, "worst": None}  # seed 3 never recovered
    assert s["tokens_failed"] == {"median": 1.0, "worst": 30.0}
    assert s["bound_coverage"] == {"median": 0.99, "worst": 0.98}  # worst is the lowest
    assert s["recovered"] == 2 and s["seeds"] == 3
    text = format_restore_summary({"discipline": s})
    assert "4.00 s / never" in text and "2 of 3 seeds" in text and "0.9900 / 0.9800" in text
