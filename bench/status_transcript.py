"""Print ``chronyc tracking`` / ``chronyc sources -v`` beside ``timesync status`` (text and -v)
for the same upstream: the transcript in docs/STATUS.md.

Setup, all on loopback and under one temp dir: a chronyd server (``local stratum 10``) on a
free UDP port; a chronyd client of it (``-x``: it never touches the clock; ``cmdport 0`` and a
command socket in the temp dir, which chronyc is pointed at, never the system's); a timesync
relay on a Unix socket with that server as its upstream; a guest disciplining a software clock.

    PYTHONPATH=. python bench/status_transcript.py [--settle 40]

Bounded: every process started here is stopped at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
CHRONYC = shutil.which("chronyc") or "/usr/bin/chronyc"
TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def chrony_conf(tmp: Path, name: str, lines: list[str]) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text("\n".join([
        "cmdport 0", f"pidfile {tmp / name}.pid", f"driftfile {tmp / name}.drift", *lines,
    ]) + "\n")
    return conf


def wait_path(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def show(title: str, args: list[str]) -> None:
    out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    print(f"$ {title}\n{out.stdout}{out.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settle", type=float, default=40.0, help="seconds before the transcript")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ts-transcript-"))
    port = free_udp_port()
    server = chrony_conf(tmp, "server", [
        f"port {port}", "bindaddress 127.0.0.1", "allow 127.0.0.1", "local stratum 10"])
    csock = tmp / "client.sock"
    client = chrony_conf(tmp, "client", [
        "port 0", f"bindcmdaddress {csock}",
        f"server 127.0.0.1 port {port} iburst minpoll 0 maxpoll 2"])
    rsock, gsock = tmp / "relay.sock", tmp / "guest.sock"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(running(
                [CHRONYD, "-x", "-d", "-u", "root", "-f", str(server)], tmp / "server.log"))
            cl = stack.enter_context(running(
                [CHRONYD, "-x", "-d", "-u", "root", "-f", str(client)], tmp / "client.log"))
            relay = stack.enter_context(running(
                [*TIMESYNC, "relay", "--listen", f"unix:{rsock}", "--upstream",
                 f"udp:127.0.0.1:{port}"], tmp / "relay.log"))
            wait_path(rsock, relay)
            guest = stack.enter_context(running(
                [*TIMESYNC, "guest", "--relay", f"unix:{rsock}", "--clock", "software",
                 "--software-freq-ppm", "20", "--software-offset", "0.005",
                 "--status-socket", str(gsock), "--minpoll", "0", "--maxpoll", "2"],
                tmp / "guest.log"))
            wait_path(gsock, guest)
            wait_path(csock, cl)
            time.sleep(a.settle)
            show("chronyc tracking", [CHRONYC, "-h", str(csock), "tracking"])
            show("timesync status", [*TIMESYNC, "status", "--socket", str(gsock)])
            show("chronyc sources -v", [CHRONYC, "-h", str(csock), "sources", "-v"])
            show("timesync status -v", [*TIMESYNC, "status", "-v", "--socket", str(gsock)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
