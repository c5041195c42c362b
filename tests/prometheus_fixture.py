"""A real Prometheus server (Debian's package) for tests: loopback, free port, data in tmp.

Under CI (``CI=true``) a missing binary fails the test; elsewhere it skips with a message.
The server found on the port is checked to be ours (its storage path is our temp dir) before
it is handed out, and it is killed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "timesync-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "timesync-dashboard.json"
JOB = "timesync-relay"


def require(tool: str) -> str:
    """Path of ``tool``; fail under CI, skip elsewhere, if it is not installed."""
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if os.path.exists(f"/usr/bin/{tool}")
                                  else None)
    if path is None:
        message = f"{tool} is not installed (apt-get install --no-install-recommends prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    return path


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_rules(text: str, for_s: int = 10, range_s: int = 10) -> str:
    """The shipped rules with every ``for:`` and every range window shortened, so a test sees
    alerts fire in seconds; thresholds and expressions are unchanged. ``for:`` stays long
    enough (10 s) to ride out the noise of frequency estimates at 1 s polls, as the shipped
    10 minutes does at production polls."""
    text = re.sub(r"\bfor: \d+[smh]\b", f"for: {for_s}s", text)
    return re.sub(r"\[\d+[smh]\]", f"[{range_s}s]", text)


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    pid: int
    workdir: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # a bad query: say which, and why
            raise AssertionError(f"{path} {params}: {exc.read().decode(errors='replace')}") \
                from exc
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"])

    def firing(self, alertname: str) -> list[dict[str, str]]:
        """Labels of the ``alertname`` alerts firing now."""
        return [a["labels"] for a in self.api("alerts")["alerts"]
                if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


@contextlib.contextmanager
def prometheus(workdir: Path, targets: list[str], rules_text: str,
               interval: str = "1s", attempts: int = 3) -> Iterator[PrometheusServer]:
    """Run Prometheus scraping ``targets`` (HOST:PORT) as job ``timesync-relay`` every
    ``interval``, evaluating ``rules_text`` as often."""
    binary = require("prometheus")
    (workdir / "rules.yml").write_text(rules_text)
    (workdir / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(workdir / "rules.yml")],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }))
    last = ""
    for attempt in range(attempts):
        data = workdir / f"data{attempt}"
        port = free_tcp_port()
        log = open(workdir / f"prometheus{attempt}.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            server = PrometheusServer(f"http://127.0.0.1:{port}", proc.pid, workdir)
            if _ours(server, proc, data):
                yield server
                return
            last = (workdir / f"prometheus{attempt}.log").read_text(errors="replace")[-2000:]
        finally:
            _stop(proc)
            log.close()
            shutil.rmtree(data, ignore_errors=True)
    raise RuntimeError(f"prometheus did not start after {attempts} attempts:\n{last}")


def _ours(server: PrometheusServer, proc: subprocess.Popen[bytes], data: Path,
          timeout_s: float = 30.0) -> bool:
    """Ready, and the server answering is the one we started (its storage path is ours)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            flags = server.api("status/flags")
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                ready = resp.status == 200
        except (OSError, ValueError, AssertionError):  # not up yet (503 while starting)
            time.sleep(0.1)
            continue
        if flags.get("storage.tsdb.path") != str(data):
            return False  # someone else's server on a reused port
        if ready:
            return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def dashboard_targets() -> list[tuple[str, list[str]]]:
    """(panel title, its query expressions) for every panel of the Grafana dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], [t["expr"] for t in p["targets"]])
            for p in doc["panels"] if p["type"] != "row"]


def grafana_to_promql(expr: str, rate_interval: str = "10s") -> str:
    """A panel query as Grafana sends it with every host and guest selected."""
    return (expr.replace("$__rate_interval", rate_interval)
            .replace("$instance", ".*").replace("$guest", ".*"))
