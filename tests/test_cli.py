"""The `timesync` command as a user runs it: separate relay and guest processes on a Unix
socket, `status`, `wait-sync` exit codes, config errors, and the demo.

The guest disciplines a software clock; nothing here writes the real clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from guest_fakes import start_ntp_server

from timesyncd.cli import main
from timesyncd.cli.runtime import ServiceFailed, serve_until_signal

pytestmark = pytest.mark.timeout(120)

TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]
STATUS_FIELDS = {
    "state", "offset_s", "frequency_ppm", "root_distance_s", "poll_s", "last_update", "steps",
    "refused_jumps", "rejected", "sources", "true_offset_s",
}


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(TIMESYNC + args, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return -9
    return proc.returncode


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(TIMESYNC + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def relay_and_guest(tmp_path: Path) -> Iterator[dict[str, Path]]:
    relay_sock = tmp_path / "relay.sock"
    status_sock = tmp_path / "guest.sock"
    relay = _spawn(["relay", "--listen", f"unix:{relay_sock}"], tmp_path / "relay.log")
    deadline = time.monotonic() + 10
    while not relay_sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    guest = _spawn(["guest", "--relay", f"unix:{relay_sock}", "--clock", "software",
                    "--software-freq-ppm", "200", "--software-offset", "0.5",
                    "--status-socket", str(status_sock), "--minpoll", "0", "--maxpoll", "2"],
                   tmp_path / "guest.log")
    try:
        yield {"status": status_sock, "dir": tmp_path}
    finally:
        codes = (_stop(guest), _stop(relay))
        logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
        assert codes == (0, 0), f"exit codes {codes}; logs: {logs}"
        assert not relay_sock.exists(), "the relay removes its socket on SIGTERM"


def test_relay_guest_status_and_wait_sync(relay_and_guest: dict[str, Path]) -> None:
    sock = str(relay_and_guest["status"])
    # Not there yet within an impossible bound: exit 1 at the timeout, not before, not a hang.
    started = time.monotonic()
    strict = _cli("wait-sync", "--socket", sock, "--max-offset", "1e-12", "--timeout", "2")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert 1.5 <= time.monotonic() - started < 20
    # Within 1 ms: exit 0 once the daemon reports it.
    ok = _cli("wait-sync", "--socket", sock, "--max-offset", "0.001", "--timeout", "45")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    st = json.loads(_cli("status", "--socket", sock, "--json").stdout)
    assert STATUS_FIELDS <= set(st)
    assert st["state"] == "synchronised"
    assert abs(st["true_offset_s"]) < 1e-3, st
    assert st["steps"] == 0 and st["refused_jumps"] == 0
    # the sign convention: the clock runs fast, so the learned frequency is positive. Under
    # host load the slope settles after the offset (noisy early samples weigh little), so
    # poll for it rather than demand it the moment wait-sync returns.
    deadline = time.monotonic() + 30
    while st["frequency_ppm"] <= 150 and time.monotonic() < deadline:
        time.sleep(0.5)
        st = json.loads(_cli("status", "--socket", sock, "--json").stdout)
    assert st["frequency_ppm"] > 150, "positive frequency: the software clock runs fast"
    assert st["sources"] and st["sources"][0]["name"].startswith("relay:")
    human = _cli("status", "--socket", sock)
    assert human.returncode == 0 and "State           : synchronised" in human.stdout
    assert "Relay link      : unix:" in human.stdout and " connected, 1 connects" in human.stdout
    # chronyc-tracking fields from the controller: the relay answers at local stratum 10
    assert st["stratum"] == 11 and st["leap_status"] == "normal", st
    assert st["reference"] == st["sources"][0]["name"] and st["rms_offset_s"] is not None
    assert st["sources"][0]["reach"] > 0 and st["sources"][0]["last_rx"] is not None
    assert "Stratum         : 11" in human.stdout and "Leap status     : normal" in human.stdout
    assert any(ln.startswith("* H relay:unix:") for ln in human.stdout.splitlines()), human.stdout


#: `timesync guest` with a clock that refuses frequency writes (as without CAP_SYS_TIME, or
#: when a seccomp policy changes under the daemon); everything else is the real CLI path
NO_FREQ_GUEST = """
import guest_client.daemon as daemon
from guest_client.clocks import SoftwareClock
class NoFreq(SoftwareClock):
    def set_frequency(self, ppm):
        raise PermissionError(1, "clock_adjtime (set frequency) not permitted")
daemon.make_clock = lambda settings: NoFreq()
from timesyncd.cli import main
main()
"""


def test_guest_exits_nonzero_when_the_clock_refuses_a_write_at_runtime(tmp_path: Path) -> None:
    """The first slew fails after start-up: the process must end by itself, not linger."""
    status_sock = tmp_path / "guest.sock"

    async def run() -> tuple[int | None, str, float]:
        ntp = await start_ntp_server()
        try:
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", NO_FREQ_GUEST, "--loop", "asyncio", "guest",
                "--server", ntp.address, "--clock", "software", "--status-socket",
                str(status_sock), "--minpoll", "-1", "--maxpoll", "0",
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 10)
            except TimeoutError as exc:
                proc.kill()
                out, _ = await proc.communicate()
                tail = out.decode()[-2000:]
                raise AssertionError(f"still running 10 s after start: {tail}") from exc
            return proc.returncode, out.decode(), time.monotonic() - started
        finally:
            ntp.close()

    code, out, elapsed = asyncio.run(run())
    assert code == 1, out
    assert "cannot adjust the clock" in out and "Error:" in out, out
    assert not status_sock.exists(), "the daemon was stopped (status socket removed)"
    assert elapsed < 10


class _FakeService:
    """Fails ``fail_after_s`` after start; a SIGTERM comes at ``signal_after_s`` regardless (so
    a runner that ignores the failure still returns, just late)."""

    def __init__(self, fail_after_s: float | None, signal_after_s: float = 0.05) -> None:
        self.fail_after_s = fail_after_s
        self.signal_after_s = signal_after_s
        self.stopped = False
        self._failed: asyncio.Future[BaseException] | None = None
        self._timers: list[asyncio.TimerHandle] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        self._timers.append(
            loop.call_later(self.signal_after_s, os.kill, os.getpid(), signal.SIGTERM))
        if self.fail_after_s is not None:
            self._timers.append(
                loop.call_later(self.fail_after_s, self._failed.set_result, OSError("gone")))

    async def stop(self) -> None:
        self.stopped = True
        for timer in self._timers:  # never signal once the runner's handler is gone
            timer.cancel()


class _FakeSupervisedService(_FakeService):
    async def wait_failed(self) -> BaseException:
        assert self._failed is not None
        return await self._failed


def test_serve_until_signal_ends_on_a_signal_or_on_the_service_failing() -> None:
    plain = _FakeService(None)  # like the relay: start/stop only
    serve_until_signal(lambda: plain, "asyncio")
    assert plain.stopped
    quiet = _FakeSupervisedService(None)
    serve_until_signal(lambda: quiet, "asyncio")
    assert quiet.stopped
    failing = _FakeSupervisedService(0.05, signal_after_s=3.0)
    started = time.monotonic()
    with pytest.raises(ServiceFailed, match="gone") as info:
        serve_until_signal(lambda: failing, "asyncio")
    assert time.monotonic() - started < 2.0, "ended by the failure, not the late signal"
    assert failing.stopped and info.value.exit_code == 1
    assert isinstance(info.value.__cause__, OSError)


def test_wait_sync_without_a_daemon_times_out(tmp_path: Path) -> None:
    res = _cli("wait-sync", "--socket", str(tmp_path / "none.sock"), "--timeout", "1")
    assert res.returncode == 1
    assert "not synchronised" in res.stderr


def test_status_without_a_daemon_says_what_to_do(tmp_path: Path) -> None:
    res = _cli("status", "--socket", str(tmp_path / "none.sock"))
    assert res.returncode == 1
    assert "timesync guest" in res.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("[guest]\nrelay = 'unix:/x'\nclock = 'software'\nbogus = 1\n",
         ["unknown key 'bogus'", "accepted keys", "relay"]),
        ("[guest]\nrelay = 'unix:/x'\nclock = 'atomic'\n", ["clock", "'system'", "'software'"]),
        ("[guest]\nrelay = 'unix:/x'\nclock = 'software'\nminpoll = 'fast'\n",
         ["minpoll", "expected int"]),
        ("[guest]\nrelay = 'carrier-pigeon:1'\nclock = 'software'\n",
         ["relay", "vsock:CID:PORT", "unix:PATH"]),
        ("[guest]\nrelay = 'unix:/x'\n", ["clock", "explicit"]),
        ("[guest\n", ["not valid TOML"]),
    ],
)
def test_guest_config_errors_name_key_and_fix(tmp_path: Path, config: str,
                                              expected: list[str]) -> None:
    path = tmp_path / "guest.toml"
    path.write_text(config)
    res = CliRunner().invoke(main, ["guest", "--config", str(path)])
    assert res.exit_code == 2, res.output
    for text in expected:
        assert text in res.output, res.output


def test_relay_flag_overrides_config_and_bad_address_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[relay]\nlisten = ['unix:/nonexistent-dir/x.sock']\nupstreams = ['tcp:1:2']\n")
    res = CliRunner().invoke(main, ["relay", "--config", str(path)])
    assert res.exit_code == 2
    assert "upstreams" in res.output and "udp:HOST:PORT" in res.output
    res = CliRunner().invoke(main, ["relay", "--listen", "vsock:nine:1"])
    assert res.exit_code == 2 and "accepted forms" in res.output


def test_forward_ntp_with_system_clock_is_refused() -> None:
    res = CliRunner().invoke(main, ["guest", "--relay", "unix:/x", "--clock", "system",
                                    "--forward-ntp", "udp:127.0.0.1:12345"])
    assert res.exit_code == 2
    assert "forward" in res.output


@pytest.mark.skipif(shutil.which("timesync") is None, reason="console script not installed")
def test_console_script_is_installed() -> None:
    res = subprocess.run(["timesync", "--version"], capture_output=True, text=True, timeout=30,
                         env={**os.environ})
    assert res.returncode == 0 and "timesync" in res.stdout


def test_demo_converges_and_summarises() -> None:
    res = _cli("demo", "--duration", "15", timeout=60)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "summary" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if "final true offset" in ln)
    final_us = float(line.split()[-2])
    assert abs(final_us) < 1000
    assert "steps 0" in res.stdout


def test_a_service_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    res = _cli("relay", "--listen", f"unix:{tmp_path}/missing/dir/r.sock", timeout=30)
    assert res.returncode == 1
    assert "Error: cannot start: listen on unix:" in res.stderr
    assert "Traceback" not in res.stderr
