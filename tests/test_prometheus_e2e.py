"""The shipped alert rules and dashboard against a real Prometheus scraping a real relay.

A relay process (``--listen unix:...``, metrics on a free loopback port) forwards to two
``chronyd -x`` upstreams for four guest daemon processes on software clocks: three run 5-7 ppm
fast, as guests sharing one host's oscillator do, and one 300 ppm fast. Prometheus (1 s
scrape and evaluation, the rules' ``for:`` and windows shortened to seconds) must then answer
every dashboard query with data and fire the frequency alert for the odd guest only; after
one upstream and one guest are stopped, the upstream and missing-guest alerts fire for exactly
those.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from chrony_fixture import chronyd
from prometheus_fixture import (
    RULES,
    PrometheusServer,
    dashboard_targets,
    fast_rules,
    grafana_to_promql,
    prometheus,
    require,
)

ROOT = Path(__file__).resolve().parent.parent
CLI = "from timesyncd.cli import main; main()"
#: Native rate errors (ppm): three guests alike, as on one host, and one the others are not.
GUEST_PPM = {"g1": 5.0, "g2": 6.0, "g3": 7.0, "odd": 300.0}
#: Dashboard queries that are empty in this setup: no NTS-KE server is configured and no
#: accept fails.
EMPTY_HERE = ("timesync_relay_nts_ke_", "timesync_relay_accept_errors_total")
T = TypeVar("T")

pytestmark = pytest.mark.timeout(240)


def wait_for(what: str, cond: Callable[[], T], timeout_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Stack:
    prom: PrometheusServer
    upstreams: list[str]  # relay upstream addresses, as the source_address label
    guests: dict[str, str]  # name -> identity the relay gave it (the guest label)
    stop_upstream: Callable[[int], None]
    stop_guest: Callable[[str], None]


def _python(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=log.open("wb"), start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require("prometheus")
    tmp = tmp_path_factory.mktemp("prom-e2e")
    sock = tmp / "relay.sock"
    with contextlib.ExitStack() as stack:
        ups = [stack.enter_context(contextlib.ExitStack()) for _ in range(2)]
        servers = [ups[i].enter_context(chronyd(stratum=3 + i)) for i in range(2)]
        addresses = [f"udp:127.0.0.1:{s.port}" for s in servers]
        relay_log = tmp / "relay.log"
        relay = _python(["--log-json", "relay", "--listen", f"unix:{sock}",
                         "--metrics", "tcp:127.0.0.1:0",
                         *[a for addr in addresses for a in ("--upstream", addr)]], relay_log)
        stack.callback(_stop, relay)
        listening = wait_for("the relay's metrics address", lambda: [
            d for d in _json_lines(relay_log) if d.get("event") == "metrics_listening"], 20)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, ppm in GUEST_PPM.items():
            procs[name] = _python([
                "guest", "--relay", f"unix:{sock}", "--clock", "software",
                "--software-freq-ppm", str(ppm), "--software-offset", "0.002", "--name", name,
                "--minpoll", "-1", "--maxpoll", "0", "--health-interval-s", "1",
                "--status-socket", str(tmp / f"{name}.sock")], tmp / f"{name}.log")
            stack.callback(_stop, procs[name])
        prom = stack.enter_context(prometheus(tmp, [listening[0]["address"]],
                                              fast_rules(RULES.read_text())))
        # the relay names each guest process by its pid (SO_PEERCRED), the name is only info
        info = wait_for("four guests in Prometheus", lambda: (
            r := prom.query("timesync_guest_info")) and len(r) == 4 and r, 60)
        guests = {r["metric"]["name"]: r["metric"]["guest"] for r in info}
        assert guests == {n: f"unix:pid:{p.pid}" for n, p in procs.items()}

        def stop_upstream(i: int) -> None:
            ups[i].close()

        def stop_guest(name: str) -> None:
            _stop(procs[name])

        yield Stack(prom, addresses, guests, stop_upstream, stop_guest)


def test_every_dashboard_panel_returns_data(stack: Stack) -> None:
    prom = stack.prom
    wait_for("every guest synchronised", lambda: len(prom.query(
        'timesync_guest_sync_state{state="synchronised"} == 1')) == 4, 90)
    # a connection that sends garbage: the "limits hit" panel's error counter has a series
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(Path(prom.workdir) / "relay.sock"))
        raw.sendall(b"\xff" * 64)
        with contextlib.suppress(OSError):
            raw.recv(100)
    wait_for("a relay error counted, over two scrapes",
             lambda: prom.query("rate(timesync_relay_errors_total[10s])"), 20)
    empty: list[tuple[str, str]] = []
    for title, exprs in dashboard_targets():
        answered = 0
        for expr in exprs:
            if prom.query(grafana_to_promql(expr)):
                answered += 1
            elif not any(name in expr for name in EMPTY_HERE):
                empty.append((title, expr))
        assert answered, f"panel {title!r}: no query returned data"
    assert empty == []


def test_alerts_fire_for_an_odd_guest_a_stopped_upstream_and_a_missing_guest(
        stack: Stack) -> None:
    prom, guests = stack.prom, stack.guests
    def outliers() -> list[str]:
        return sorted(a["guest"] for a in prom.firing("TimesyncGuestFrequencyOutlier"))

    # while the guests' frequency estimates converge any of them may depart for a while; once
    # they have, the odd one (and only it) stays an outlier
    try:
        wait_for("the frequency alert for the odd guest only",
                 lambda: outliers() == [guests["odd"]], 90)
    except AssertionError as exc:
        freq = {r["metric"]["guest"]: float(r["value"][1]) * 1e6
                for r in prom.query("timesync_guest_frequency_ratio")}
        raise AssertionError(f"{exc}: firing for {outliers()}, ppm {freq}") from None
    time.sleep(2)
    assert outliers() == [guests["odd"]]
    freq = {r["metric"]["guest"]: float(r["value"][1]) * 1e6
            for r in prom.query("timesync_guest_frequency_ratio")}
    for name, ppm in GUEST_PPM.items():  # what fired is what the clocks do (estimates at
        assert abs(freq[guests[name]] - ppm) < 25, (name, freq)  # 1 s polls are noisy)
    # the others are within a few ppm of their median; nothing else is wrong yet
    for quiet in ("TimesyncUpstreamUnreachable", "TimesyncGuestMissing", "TimesyncRelayDown",
                  "TimesyncGuestNotSynchronised", "TimesyncGuestErrorBoundHigh",
                  "TimesyncGuestNotReporting", "TimesyncGuestDisrupted",
                  "TimesyncHostDisruptionStorm"):
        assert prom.firing(quiet) == [], quiet

    stack.stop_upstream(1)
    stack.stop_guest("g3")
    down = wait_for("the upstream alert", lambda: prom.firing("TimesyncUpstreamUnreachable"),
                    60)
    assert [a["source_address"] for a in down] == [stack.upstreams[1]]
    missing = wait_for("the missing-guest alert", lambda: prom.firing("TimesyncGuestMissing"),
                       60)
    assert [a["guest"] for a in missing] == [guests["g3"]]
    # the odd guest is still an outlier among the three left
    assert guests["odd"] in outliers()
    assert prom.firing("TimesyncRelayDown") == []
