"""drift-sim for long and many runs: shortened day lists, a table across seeds, outputs and
optional dependencies checked before the run, progress on stderr when it is not a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sim import summary
from sim.report import day_list
from timesyncd.cli.drift_sim import _Progress, drift_sim

ROOT = Path(__file__).resolve().parent.parent


def test_long_day_lists_are_shortened_with_the_worst_day() -> None:
    week = [-1.0 * d for d in range(1, 8)]
    assert day_list(week).count(" d") == 6 and "..." not in day_list(week)
    year = [0.001 * ((d * 37) % 101 - 50) for d in range(365)]
    text = day_list(year)
    assert text.startswith("d1 ") and "d365 " in text and "d4 " not in text
    worst = max(range(365), key=lambda i: abs(year[i]))
    assert f"(worst d{worst + 1} " in text and "all 365 days in --json" in text


def test_seeds_get_a_median_and_worst_table_and_json_summary() -> None:
    args = ["--seeds", "1-3", "--days", "0.5", "--strategies", "none,step", "--leeway", "0"]
    text = CliRunner().invoke(drift_sim, args)
    assert text.exit_code == 0, text.output
    doc = json.loads(CliRunner().invoke(drift_sim, [*args, "--json"]).stdout)
    per_seed = doc["seeds"]
    s = doc["summary"]["none"]
    maxes = sorted(per_seed[k]["strategies"]["none"]["max_abs_offset_s"] for k in per_seed)
    assert s["max_abs_offset_s"] == {"median": maxes[1], "worst": maxes[2]}
    firsts = [per_seed[k]["strategies"]["none"]["first_rejection_s"] for k in per_seed]
    assert s["first_rejection_s"]["earliest"] == min(f for f in firsts if f is not None)
    assert s["first_rejection_s"]["seeds_with_rejections"] == sum(f is not None for f in firsts)
    rejected = sorted(sum(per_seed[k]["strategies"]["none"]["rejected"].values())
                      for k in per_seed)
    assert s["rejected_total"] == {"median": rejected[1], "worst": rejected[2]}
    assert "summary over 3 seeds (median / worst)" in text.output
    line = next(x for x in text.output.splitlines() if x.strip().startswith("none "))
    assert f"{rejected[1]:g} / {rejected[2]:g}" in line


@pytest.mark.parametrize("option", ["--csv", "--plot"])
def test_unwritable_outputs_fail_before_the_run(option: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    # 30 days would take ~10 s: an error in well under that means nothing was simulated
    res = CliRunner().invoke(drift_sim, ["--days", "30", option, str(tmp_path / "no" / "x")])
    assert res.exit_code == 2 and f"{option}: directory" in res.output
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access  # a read-only directory (root ignores modes, so say it is one)
    monkeypatch.setattr(summary.os, "access",
                        lambda p, mode: False if Path(p) == ro else real(p, mode))
    res = CliRunner().invoke(drift_sim, ["--days", "30", option, str(ro / "x")])
    assert res.exit_code == 2 and "not writable" in res.output
    assert time.monotonic() - started < 4


def test_missing_matplotlib_fails_before_the_run(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    real = summary.importlib.util.find_spec
    monkeypatch.setattr(summary.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    started = time.monotonic()
    res = CliRunner().invoke(drift_sim, ["--days", "30", "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 2 and "timesync[plot]" in res.output
    assert time.monotonic() - started < 3


def test_progress_lines_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = _Progress(2, stream)
    bar("none", 0.0)
    assert stream.getvalue() == ""  # within the first second
    bar.started -= 2.0
    bar("discipline", 0.0)
    bar("discipline", 0.5)
    bar("discipline", 0.6)  # within LINE_EVERY_S of the last line: nothing more
    lines = stream.getvalue().splitlines()
    assert lines == ["drift-sim:  50% done, run 2/2 discipline 0%, 2 s"]
    bar.last_line -= _Progress.LINE_EVERY_S
    bar("discipline", 0.5)
    assert stream.getvalue().splitlines()[-1].startswith("drift-sim:  75% done, run 2/2 "
                                                         "discipline 50%")
    assert "\r" not in stream.getvalue()


def test_redirected_run_reports_progress_on_stderr_and_clean_json(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # 4 days of discipline take a few seconds: the first line comes after one
    out = subprocess.run([sys.executable, "-c", "from timesyncd.cli import main; main()",
                          "drift-sim", "--days", "4",
                          "--strategies", "discipline", "--json"], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)  # nothing but the document on stdout
    assert "drift-sim:" in out.stderr and "run 1/1 discipline" in out.stderr
