"""``timesync drift-sim``: the seed story, the three strategies, schema, files, determinism."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guest_client.controller import GuestController
from sim.runner import build_inputs
from sim.scenario import DAY_S, Scenario
from sim.strategies import run_discipline
from timesyncd.cli.drift_sim import drift_sim
from timesyncd.discipline import DisciplineConfig

SIM_DIR = Path(__file__).resolve().parent.parent / "sim"


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(drift_sim, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("drift")
    r = invoke("--json", "--csv", str(out / "series.csv"), "--plot", str(out / "plot.png"))
    return json.loads(r.stdout), out  # progress lines go to stderr


def test_json_schema(default_run: tuple[dict[str, Any], Path]) -> None:
    doc, _ = default_run
    assert set(doc) == {"scenario", "strategies"}
    assert doc["scenario"]["days"] == 7 and doc["scenario"]["load"] == "diurnal"
    assert set(doc["strategies"]) == {"none", "step", "discipline"}
    for s in doc["strategies"].values():
        for key in ("max_abs_offset_s", "forward_jumps", "backward_jumps", "rejected",
                    "accepted_expired", "first_rejection_s", "offset_at_day_end_s"):
            assert key in s
        assert set(s["rejected"]) == set(s["accepted_expired"]) == {"jwt", "x509", "totp"}
        assert len(s["offset_at_day_end_s"]) == 7


def test_seed_story_no_sync_first_jwt_rejection_day_2_5_to_3_5(
        default_run: tuple[dict[str, Any], Path]) -> None:
    none = default_run[0]["strategies"]["none"]
    assert 2.5 * DAY_S <= none["first_rejection_s"] <= 3.5 * DAY_S
    assert none["first_rejection_by_kind_s"]["jwt"] == none["first_rejection_s"]
    # behind, not ahead: ~1.1 s lost per day, the slow clock also accepts expired replays
    assert all(o < 0 for o in none["offset_at_day_end_s"])
    assert none["offset_at_day_end_s"][0] == pytest.approx(-1.1, abs=0.1)
    assert none["accepted_expired"]["jwt"] > 0


def test_discipline_keeps_offset_under_a_millisecond(
        default_run: tuple[dict[str, Any], Path]) -> None:
    d = default_run[0]["strategies"]["discipline"]
    assert d["max_abs_offset_s"] < 1e-3
    assert sum(d["rejected"].values()) == 0 and sum(d["accepted_expired"].values()) == 0
    assert d["forward_jumps"] == d["backward_jumps"] == 0


def test_discipline_reports_error_bound_coverage(
        default_run: tuple[dict[str, Any], Path]) -> None:
    """Issue 9: coverage is a measured figure. The default scenario's seed 1 meets the
    targets (docs/BENCHMARKS.md has seeds 1-10 of four scenarios): the bound contains the
    true offset at every 10 s sample, and its median is at most twice half the median round
    trip plus the poll interval times 1 ppm."""
    d = default_run[0]["strategies"]["discipline"]
    assert d["bound_coverage"] >= 0.999 and d["max_true_over_bound"] <= 1.0
    assert 0 < d["median_bound_s"] and d["bound_over_target"] <= 2.0
    assert 0 < d["max_freq_error_ppm"] < DisciplineConfig().max_clock_error_ppm


def test_table_shows_coverage_for_a_relay_outage() -> None:
    r = invoke("--days", "1", "--strategies", "discipline", "--outage", "6h:1h")
    assert "bound_coverage: 1.0" in r.output and "median_bound_s:" in r.output


def test_csv_and_plot_files(default_run: tuple[dict[str, Any], Path]) -> None:
    _, out = default_run
    lines = (out / "series.csv").read_text().splitlines()
    assert lines[0] == "strategy,time_s,day,offset_s,rejected_total"
    strategies = {ln.split(",")[0] for ln in lines[1:]}
    assert strategies == {"none", "step", "discipline"}
    last_none = [ln for ln in lines if ln.startswith("none,")][-1].split(",")
    assert int(last_none[4]) > 0 and float(last_none[3]) < -7
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_step_jumps_both_ways_under_varying_vsock_delay() -> None:
    r = invoke("--json", "--days", "1", "--strategies", "step", "--vsock-queue", "0.005")
    step = json.loads(r.stdout)["strategies"]["step"]
    assert step["forward_jumps"] > 0 and step["backward_jumps"] > 0
    assert step["max_backward_jump_s"] > 1e-3
    assert step["forward_jumps"] + step["backward_jumps"] == step["step_reads"]


def test_same_seed_same_result_other_seed_differs() -> None:
    args = ("--json", "--days", "0.5", "--strategies", "step,discipline")

    def strip(doc: dict[str, Any]) -> dict[str, Any]:
        for s in doc["strategies"].values():
            s.pop("wall_s")
        return doc

    a = strip(json.loads(invoke(*args, "--seed", "5").stdout))
    b = strip(json.loads(invoke(*args, "--seed", "5").stdout))
    c = strip(json.loads(invoke(*args, "--seed", "6").stdout))
    assert a == b
    assert a["strategies"] != c["strategies"]


def test_outage_and_table_output() -> None:
    r = invoke("--days", "1", "--strategies", "none,step", "--outage", "6h:6h", "--load",
               "bursty")
    assert "== none ==" in r.output and "== step ==" in r.output
    assert "failed_reads: 72" in r.output  # 6 h of 300 s reads lost to the outage
    bad = CliRunner().invoke(drift_sim, ["--outage", "6h", "--days", "1"])
    assert bad.exit_code != 0 and "START:DURATION" in bad.output


def test_seeds_json_shape() -> None:
    doc = json.loads(invoke("--json", "--days", "0.2", "--strategies", "none",
                            "--seeds", "1-3").output)
    assert list(doc["seeds"]) == ["1", "2", "3"]
    assert doc["seeds"]["2"]["scenario"]["seed"] == 2


def test_simulator_drives_the_daemons_controller() -> None:
    """No fork of the guest logic: the sim drives guest_client.controller.GuestController."""
    sc = Scenario(days=0.01, strategies=("discipline",))
    traj = run_discipline(build_inputs(sc), __import__("numpy").array([10.0, 600.0]))
    assert traj.engine is not None
    assert type(traj.engine.controller) is GuestController
    assert traj.extra["packets_sent"] > 0
    for path in SIM_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        assert not any("controller" in c.lower() for c in classes), (path, classes)
        funcs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not {"on_reply", "on_timer"} & funcs, path
