"""Signals and start/stop messages, with real processes: SIGHUP stops the guest and the relay
cleanly as chronyd does (no runtime reload), every stop logs one line naming its cause, and no
socket file is left behind. The guest disciplines a software clock; the relay listens on a Unix
socket only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)

TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(TIMESYNC + args, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path} never appeared: {log.read_text()}"
        time.sleep(0.05)


def _stop_with(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return -9


def test_sighup_stops_guest_and_relay_cleanly_with_one_line_each(tmp_path: Path) -> None:
    relay_sock, status_sock = tmp_path / "relay.sock", tmp_path / "guest.sock"
    relay_log, guest_log = tmp_path / "relay.log", tmp_path / "guest.log"
    relay = _spawn(["relay", "--listen", f"unix:{relay_sock}"], relay_log)
    guest = None
    try:
        _wait_for(relay_sock, relay, relay_log)
        # a global option after the subcommand: JSON logs, parsed below
        guest = _spawn(["guest", "--relay", f"unix:{relay_sock}", "--clock", "software",
                        "--status-socket", str(status_sock), "--minpoll", "-1", "--maxpoll",
                        "0", "--log-json"], guest_log)
        _wait_for(status_sock, guest, guest_log)
        deadline = time.monotonic() + 20
        while '"state_change"' not in guest_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stop_with(guest, signal.SIGHUP) == 0, guest_log.read_text()
        assert _stop_with(relay, signal.SIGHUP) == 0, relay_log.read_text()
    finally:
        for p in (guest, relay):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
    assert not status_sock.exists() and not relay_sock.exists(), "sockets left behind"
    events = [json.loads(line) for line in guest_log.read_text().splitlines()
              if line.startswith("{")]
    stops = [e for e in events if e["msg"].startswith("stopping")]
    assert [e["msg"] for e in stops] == ["stopping on SIGHUP received"], events
    start = next(e for e in events if e.get("event") == "guest_started")
    assert "sources: every upstream of relay unix:" in start["msg"], start
    change = next(e for e in events if e.get("event") == "state_change")
    assert change["from_state"] == "unsynchronised" and change["to_state"] == "synchronised"
    text = relay_log.read_text()
    assert text.count("stopping on SIGHUP received") == 1, text
    assert text.count("relay listening") == 1, text
    assert "Traceback" not in text + guest_log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_int_and_term_stop_the_relay_with_their_cause_logged(tmp_path: Path,
                                                              sig: signal.Signals) -> None:
    sock, log = tmp_path / "relay.sock", tmp_path / "relay.log"
    relay = _spawn(["relay", "--listen", f"unix:{sock}"], log)
    try:
        _wait_for(sock, relay, log)
        assert _stop_with(relay, sig) == 0, log.read_text()
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(5)
    assert not sock.exists()
    assert log.read_text().count(f"stopping on {sig.name} received") == 1, log.read_text()


@pytest.mark.parametrize("command", ["relay", "guest"])
def test_missing_socket_folder_is_refused_the_same_way_by_both(tmp_path: Path,
                                                               command: str) -> None:
    """One rule for socket folders (docs/DEPLOYMENT.md): neither service creates them."""
    path = tmp_path / "missing" / "x.sock"
    args = (["relay", "--listen", f"unix:{path}"] if command == "relay" else
            ["guest", "--server", "udp:127.0.0.1:9", "--clock", "software",
             "--status-socket", str(path)])
    res = subprocess.run(TIMESYNC + args, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res.stderr
    assert f"folder {path.parent} does not exist" in res.stderr, res.stderr
    assert not path.parent.exists()
    assert "Traceback" not in res.stderr
