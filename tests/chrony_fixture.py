"""A real ``chronyd`` on loopback for tests, started and stopped safely.

``chronyd -x`` never touches the clock; it serves time from ``local stratum N`` on a free
UDP port of 127.0.0.1 with no command port. Before handing it out we check that the process
owning the socket on that port is the one we started (another server on a reused port must
not make a test pass), and that it answers NTP with the configured stratum.

Usage::

    with chronyd() as server:            # or chronyd(stratum=7, extra_config=["ntsport ..."])
        ntp_query(server.port)

or the pytest fixture ``chrony_server`` (import it into a test module).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.packets import client_packet

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
_NTP_UNIX_DELTA = 2_208_988_800


@dataclass(frozen=True)
class ChronyServer:
    host: str
    port: int
    pid: int
    stratum: int
    workdir: Path

    @property
    def address(self) -> str:
        """In the project's address syntax, e.g. for a relay upstream."""
        return f"udp:{self.host}:{self.port}"


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago (chronyd binds it next; we verify ownership)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def query(host: str, port: int, timeout: float = 1.0) -> bytes | None:
    """Send one client request; return the reply if it echoes our transmit timestamp."""
    request = client_packet()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(request, (host, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, peer = s.recvfrom(4096)
            except TimeoutError:
                return None
            if peer[1] == port and len(data) >= 48 and data[24:32] == request[40:48]:
                return data
    return None


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def udp_port_owner_inode(port: int) -> str | None:
    """Inode of the UDP socket bound to 127.0.0.1:port, from /proc/net/udp."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == want:
                return cols[9]
    return None


def _config(workdir: Path, port: int, stratum: int, extra: Iterable[str]) -> str:
    lines = [
        f"port {port}",
        "cmdport 0",
        "bindaddress 127.0.0.1",
        "allow 127.0.0.1",
        f"local stratum {stratum}",
        f"pidfile {workdir / 'chronyd.pid'}",
        f"driftfile {workdir / 'drift'}",
        f"ntsdumpdir {workdir}",
        *extra,
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def chronyd(
    stratum: int = 5,
    extra_config: Iterable[str] = (),
    startup_timeout: float = 10.0,
    attempts: int = 3,
    port: int | None = None,
) -> Iterator[ChronyServer]:
    """Run ``chronyd -x -d`` on 127.0.0.1 and yield a verified :class:`ChronyServer`.

    ``port``: serve on this UDP port (to restart a server where its clients expect it)
    instead of a free one. ``extra_config`` lines are appended verbatim (e.g.
    ``ntsserverkey``, ``ntsservercert``, ``ntsport``); files they name should live under
    ``server.workdir`` or the caller's own dir.
    """
    if not os.path.exists(CHRONYD):
        pytest.skip("chronyd is not installed")
    extra = list(extra_config)
    last_error = ""
    for _ in range(attempts):
        workdir = Path(tempfile.mkdtemp(prefix="chronyd-test-"))
        use_port = port if port is not None else free_udp_port()
        conf = workdir / "chrony.conf"
        conf.write_text(_config(workdir, use_port, stratum, extra))
        log = open(workdir / "chronyd.log", "wb")  # noqa: SIM115 - closed in finally
        # -x: never touch the clock; -d: foreground, log to stderr; -u root: keep write access
        # to the root-owned temp dir (chronyd drops to its own user by default).
        proc = subprocess.Popen(
            [CHRONYD, "-x", "-d", "-u", "root", "-f", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            server = _wait_ready(proc, use_port, stratum, workdir, startup_timeout)
            if server is None:
                last_error = (workdir / "chronyd.log").read_text(errors="replace")[-2000:]
                continue
            yield server
            return
        finally:
            _stop(proc)
            log.close()
            shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"chronyd did not start after {attempts} attempts; last log:\n{last_error}")


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, stratum: int, workdir: Path, timeout: float
) -> ChronyServer | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        inode = udp_port_owner_inode(port)
        if inode is not None and inode in _socket_inodes(proc.pid):
            reply = query("127.0.0.1", port, timeout=0.5)
            # chronyd answers "unsynchronised" for a moment after start; wait for stratum
            if reply is not None and reply[1] == stratum and reply[0] >> 6 != 3:
                return ChronyServer("127.0.0.1", port, proc.pid, stratum, workdir)
        elif inode is not None:
            return None  # someone else holds the port: retry on a new one
        time.sleep(0.05)
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def chrony_server() -> Iterator[ChronyServer]:
    """Module-scoped chronyd at stratum 5 (import this name into a test module to use it)."""
    with chronyd() as server:
        yield server
