"""Structured logs: JSON lines parse, repeated faults are rate-limited and summarised, and the
relay run from the CLI logs through them with useful fields."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from relay_helpers import Guest

from timesyncd import logs
from timesyncd.health import HealthReport
from timesyncd.logs import JsonLinesFormatter, RepeatFilter

ROOT = Path(__file__).resolve().parent.parent


def _record(msg: str, *args: Any, level: int = logging.WARNING, name: str = "t",
            **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_message_level_and_extra_fields() -> None:
    fmt = JsonLinesFormatter()
    line = fmt.format(_record("guest %s connected", "cid:16", guest="cid:16",
                              guest_name='we"ird\nname', reports=3, obj=object()))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "guest cid:16 connected" and doc["level"] == "warning"
    assert doc["logger"] == "t" and doc["guest"] == "cid:16" and doc["reports"] == 3
    assert doc["guest_name"] == 'we"ird\nname' and doc["obj"].startswith("<object")
    assert isinstance(doc["ts"], float)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = _record("failed")
        rec.exc_info = sys.exc_info()
    assert "RuntimeError: boom" in json.loads(fmt.format(rec))["exc"]


def test_repeats_are_rate_limited_then_summarised(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    f = RepeatFilter(interval_s=60, burst=3)
    passed = [f.filter(_record("upstream %s: request failed (%s)", "u", "timeout"))
              for _ in range(100)]
    assert passed.count(True) == 3 and passed[:3] == [True] * 3
    # another template and anything below WARNING are not affected
    assert f.filter(_record("guest %s refused", "x"))
    assert all(f.filter(_record("tick", level=logging.INFO)) for _ in range(50))
    now[0] += 61
    rec = _record("upstream %s: request failed (%s)", "u", "timeout")
    assert f.filter(rec)
    assert rec.suppressed_repeats == 97  # type: ignore[attr-defined]
    assert rec.getMessage() == ("upstream u: request failed (timeout) "
                                "(and 97 similar messages suppressed)")
    assert json.loads(JsonLinesFormatter().format(rec))["suppressed_repeats"] == 97


def test_repeat_filter_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    f = RepeatFilter()
    for i in range(5000):
        now[0] += 0.001
        f.filter(_record(f"distinct {i}"))
    assert len(f._windows) <= 1025


def _wait_for(cond: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.timeout(60)
def test_relay_cli_logs_json_lines_with_fields(tmp_path: Path) -> None:
    """`timesync --log-json relay --metrics ...`: every stderr line is JSON; events carry
    fields; a guest shows up in the scrape; SIGTERM stops it cleanly."""
    sock = tmp_path / "relay.sock"
    err = (tmp_path / "stderr").open("w")
    code = "from timesyncd.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--log-json", "--log-level", "debug", "relay",
         "--listen", f"unix:{sock}", "--metrics", "tcp:127.0.0.1:0"],
        cwd=ROOT, stderr=err, stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        def lines() -> list[dict[str, Any]]:
            text = (tmp_path / "stderr").read_text()
            return [json.loads(ln) for ln in text.splitlines() if ln.strip()]

        listening = _wait_for(lambda: [d for d in lines()
                                       if d.get("event") == "metrics_listening"])
        address = listening[0]["address"]
        async def visit() -> None:
            g = await Guest.connect(f"unix:{sock}", name="enclave-7")
            g.send(HealthReport(state="synchronised", offset_s=4e-6, frequency_ppm=-7.5).frame())
            await asyncio.sleep(0.2)
            url = f"http://{address}/metrics"
            body = await asyncio.get_running_loop().run_in_executor(
                None, lambda: urllib.request.urlopen(url, timeout=3).read())
            assert (f'timesync_guest_info{{guest="unix:pid:{os.getpid()}",name="enclave-7"}} 1.0'
                    .encode()) in body
            assert f'timesync_guest_frequency_ratio{{guest="unix:pid:{os.getpid()}"}} -7.5e-06'\
                .encode() in body
            await g.close()

        asyncio.run(visit())
        _wait_for(lambda: [d for d in lines() if d.get("event") == "guest_disconnected"])
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        err.close()
    assert rc == 0
    docs = lines()
    connected = [d for d in docs if d.get("event") == "guest_connected"]
    assert connected and connected[0]["guest"] == f"unix:pid:{os.getpid()}"
    assert connected[0]["guest_name"] == "enclave-7" and connected[0]["level"] == "info"
    gone = [d for d in docs if d.get("event") == "guest_disconnected"][0]
    assert gone["reports"] == 1
    assert all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)


def test_event_gate_passes_a_burst_per_window_then_reports_what_it_held_back():
    from timesyncd.logs import EventGate

    now = [0.0]
    gate = EventGate(interval_s=60, burst=3, clock=lambda: now[0])
    assert [gate.allow("connect") for _ in range(5)] == [0, 0, 0, None, None]
    assert gate.allow("disconnect") == 0  # kinds are separate
    now[0] = 61.0
    assert gate.allow("connect") == 2  # the next line carries the count held back
    assert gate.allow("connect") == 0


def test_guest_churn_logs_a_few_lines_not_one_per_connection(tmp_path, caplog):
    import asyncio
    import logging

    from relay_helpers import Guest

    from host_relay.service import RelayService
    from host_relay.settings import RelaySettings

    sock = tmp_path / "relay.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        try:
            for _ in range(40):
                guest = await Guest.connect(f"unix:{sock}")
                await guest.close()
            await asyncio.sleep(0.2)
            assert relay.stats.connections_accepted == 40
        finally:
            await relay.stop()

    with caplog.at_level(logging.INFO, logger="host_relay"):
        asyncio.run(main())
    events = [getattr(r, "event", "") for r in caplog.records]
    assert 1 <= events.count("guest_connected") <= 5
    assert 1 <= events.count("guest_disconnected") <= 5
