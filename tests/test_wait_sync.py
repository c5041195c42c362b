"""`timesync wait-sync` as `chronyc waitsync`: exit 0 synchronised, 1 timed out, 2 usage error,
3 an error waiting cannot fix (reported at once); a progress line per try unless -q; it waits on
the offset, the error bound and the remaining correction. A small thread serves fixed status
answers on a Unix socket (the real daemon path is covered in test_cli.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from timesyncd.cli import main

pytestmark = pytest.mark.timeout(60)

SYNCED = {"state": "synchronised", "offset_s": 0.0004, "root_distance_s": 0.5,
          "remaining_correction_s": 2e-5, "sources": []}


@contextlib.contextmanager
def answering(path: Path, answer: bytes) -> Iterator[None]:
    """Answer every connection on ``path`` with ``answer`` (one line)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(256)
                    conn.sendall(answer + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        srv.close()
        path.unlink()


def _status(path: Path, st: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    return answering(path, json.dumps(st).encode())


def _wait(*args: str) -> Any:
    return CliRunner().invoke(main, ["wait-sync", *args])


def test_synchronised_exits_0_and_says_so(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with _status(sock, SYNCED):
        res = _wait("--socket", str(sock), "--max-offset", "0.001")
    assert res.exit_code == 0, res.output
    assert "synchronised: state synchronised, offset +400.000 us" in res.output


def test_error_bound_and_correction_thresholds(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with _status(sock, SYNCED):
        # the error bound falls back to root_distance_s (0.5 s): above 0.1 s, so time out
        res = _wait("--socket", str(sock), "--max-error", "0.1", "--timeout", "0.3",
                    "--interval", "0.1")
        assert res.exit_code == 1, res.output
        tries = [ln for ln in res.output.splitlines() if ln.startswith("try ")]
        assert len(tries) >= 2 and "error bound 500.000 ms" in tries[0], res.output
        assert "not synchronised within 0.3 s" in res.output
        res = _wait("--socket", str(sock), "--max-correction", "1e-5", "--timeout", "0.2",
                    "--interval", "0.1", "-q")
        assert res.exit_code == 1, res.output
        assert not [ln for ln in res.output.splitlines() if ln.startswith("try ")], "quiet"
        assert _wait("--socket", str(sock), "--max-correction", "1e-4").exit_code == 0
    with _status(sock, {**SYNCED, "error_bound_s": 0.05}):  # preferred when reported
        res = _wait("--socket", str(sock), "--max-error", "0.1", "--timeout", "1")
        assert res.exit_code == 0, res.output


def test_no_daemon_yet_is_retried_with_a_line_per_try(tmp_path: Path) -> None:
    started = time.monotonic()
    res = _wait("--socket", str(tmp_path / "none.sock"), "--timeout", "0.5", "--interval",
                "0.1")
    assert res.exit_code == 1 and time.monotonic() - started >= 0.5
    tries = [ln for ln in res.output.splitlines() if ln.startswith("try ")]
    assert len(tries) >= 3 and "No such file or directory" in tries[0], res.output
    assert "[Errno" not in res.output


@pytest.mark.parametrize("kind", ["regular_file", "not_status", "under_a_file"])
def test_errors_waiting_cannot_fix_exit_3_at_once(tmp_path: Path, kind: str) -> None:
    sock = tmp_path / "s.sock"
    target = str(sock)
    ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if kind == "regular_file":
        sock.write_text("not a socket")
    elif kind == "not_status":
        ctx = answering(sock, b"SSH-2.0-OpenSSH_9.2")
    else:
        sock.write_text("")
        target = str(sock / "guest.sock")
    started = time.monotonic()
    with ctx:
        res = _wait("--socket", target, "--timeout", "30")
    assert res.exit_code == 3, res.output
    assert time.monotonic() - started < 5, "reported at once, not after the timeout"
    assert res.output.count("Error:") == 1 and "Traceback" not in res.output


def test_permission_denied_exits_3_at_once(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who may not connect: no amount of waiting helps. (The tests run as root, whom
    file modes do not stop, so connect's EACCES is injected.)"""
    import timesyncd.cli.status as status_cli

    def denied(path: str, timeout: float) -> dict[str, Any]:
        raise PermissionError(13, "Permission denied")

    sock = tmp_path / "s.sock"
    with _status(sock, SYNCED):
        monkeypatch.setattr(status_cli, "query_status", denied)
        started = time.monotonic()
        res = _wait("--socket", str(sock), "--timeout", "30")
    assert res.exit_code == 3, res.output
    assert "Permission denied" in res.output and time.monotonic() - started < 5
    assert "[Errno" not in res.output


def test_status_gives_no_start_the_daemon_hint_for_a_permanent_error(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    sock.write_text("")
    res = CliRunner().invoke(main, ["status", "--socket", str(sock)])
    assert res.exit_code == 1
    assert "is not a socket" in res.output and "is `timesync guest` running" not in res.output
