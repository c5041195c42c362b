"""The shipped alert rules, their promtool unit tests, the scrape config and the Grafana
dashboard: valid for Prometheus's own tools, complete (every alert tested and in the runbook),
and written against metric names the relay serves (docs/METRICS.md)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_fixture import DASHBOARD, ROOT, RULES, dashboard_targets, fast_rules, require
from test_metrics_naming import naming_table

pytestmark = pytest.mark.timeout(60)
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_TESTS = PROM_DIR / "timesync-alerts.test.yml"


def _alerts() -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_checks_rules_and_config() -> None:
    promtool = require("promtool")
    rules = _run(promtool, "check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in rules.stdout
    config = _run(promtool, "check", "config", str(PROM_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert_firing_and_quiet() -> None:
    result = _run(require("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == set(_alerts()) and quiet == set(_alerts())


def test_every_alert_has_a_runbook_line_and_uses_only_served_metrics() -> None:
    deployment = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    known = set(naming_table()) | {"up"}
    for name, rule in _alerts().items():
        anchor = f"runbook-{name.lower()}"
        assert f'<a id="{anchor}"></a>`{name}`' in deployment, name
        assert rule["annotations"]["runbook_url"].endswith(f"#{anchor}")  # type: ignore[index]
        used = set(re.findall(r"\b(timesync_[a-z_]+|up)\b", str(rule["expr"])))
        assert used and used <= known, (name, used - known)


def test_fast_rules_shorten_durations_and_windows_only() -> None:
    text = RULES.read_text()
    fast = fast_rules(text)
    assert re.findall(r"for: (\S+)", fast) == ["10s"] * len(re.findall(r"for: ", text))
    assert set(re.findall(r"\[([^\]]+)\]", fast)) == {"10s"}
    assert re.sub(r"\d+[smh]\b", "", fast) == re.sub(r"\d+[smh]\b", "", text)


def test_dashboard_has_a_fleet_and_a_relay_view_on_served_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert [r.split(":")[0] for r in rows] == ["Fleet", "Relay"]
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "instance", "guest"}
    known = set(naming_table()) | {"up"}
    panels = dashboard_targets()
    assert len(panels) >= 15
    for title, exprs in panels:
        assert exprs, title
        for expr in exprs:
            names = {n.removesuffix("_bucket")
                     for n in re.findall(r"\b(timesync_[a-z_]+|up)\{", expr)}
            assert names and names <= known, (title, names - known)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(t for t, _ in panels).lower()
    for needed in ("offset", "error bound", "state", "median", "reachability", "residence",
                   "traffic", "limits", "round trip"):
        assert needed in titles, needed


def test_rules_and_dashboard_are_referenced_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in (RULES, DASHBOARD):
        assert str(path.relative_to(ROOT)) in readme
    assert Path(ROOT / "docs" / "METRICS.md").exists()


def test_ci_installs_prometheus_without_starting_it() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    install = next(ln for ln in script.splitlines() if "apt-get install" in ln)
    assert "--no-install-recommends" in install and "prometheus" in install.split()
    # the "already installed" check looks for both binaries, so CI installs them when missing
    check = script[script.index("if [ ! -x"):script.index("; then")]
    assert "command -v prometheus" in check and "command -v promtool" in check
    assert "policy-rc.d" in script and "exit 101" in script


def test_missing_prometheus_fails_under_ci_and_skips_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import prometheus_fixture

    monkeypatch.setattr(prometheus_fixture.shutil, "which", lambda _name: None)
    monkeypatch.setattr(prometheus_fixture.os.path, "exists", lambda _path: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require("prometheus")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require("prometheus")
