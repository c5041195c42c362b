"""The relay as a process (`timesync relay`) under faults only a process can have: stopped
with SIGSTOP and continued, and started under a low descriptor limit. Both event loops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chrony_fixture import ChronyServer, chrony_server  # noqa: F401 - pytest fixture
from loops import LOOPS
from relay_helpers import Guest, client_packet

from host_relay.relay_query import format_relay_status, query_relay
from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameType

pytestmark = pytest.mark.timeout(120)

TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    def __init__(self, tmp: Path, loop: str, args: list[str], nofile: tuple[int, int] | None):
        self.sock = tmp / "relay.sock"
        self.metrics = f"127.0.0.1:{free_tcp_port()}"
        self.log = tmp / "relay.log"

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*TIMESYNC, "--loop", loop, "relay", "--listen", f"unix:{self.sock}",
                 "--metrics", f"tcp:{self.metrics}", *args],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)
        deadline = time.monotonic() + 15
        while True:
            try:
                doc = query_relay(self.metrics, timeout=1)
                assert doc["relay"]["connections_open"] == 0  # ours: fresh, nobody connected
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(self.log.read_text()) from None
                time.sleep(0.1)

    def status(self) -> dict:
        return query_relay(self.metrics, timeout=3)

    def metrics_text(self) -> str:
        with socket.create_connection(self.metrics.rsplit(":", 1), timeout=3) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.log.read_text()


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator:
    started: list[RelayProcess] = []

    def start(loop: str, args: list[str], nofile: tuple[int, int] | None = None) -> RelayProcess:
        started.append(RelayProcess(tmp_path, loop, args, nofile))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def health_frame() -> framing.Frame:
    return framing.Frame(FrameType.HEALTH, 0, json.dumps(
        {"version": 1, "state": "synchronised"}).encode())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_sigstop_sigcont_drops_stale_requests_and_charges_no_health_reports(
        relay_process, chrony_server: ChronyServer, loop_kind: str) -> None:  # noqa: F811
    relay = relay_process(loop_kind, ["--upstream", chrony_server.address,
                                      "--stale-request-s", "1"])

    async def main() -> None:
        guest = await Guest.connect(f"unix:{relay.sock}")
        guest.request(1, 0, client_packet())
        assert (await guest.recv()).type == FrameType.NTP_REPLY
        relay.proc.send_signal(signal.SIGSTOP)
        try:
            for rid in (10, 11, 12):  # the guest polls on; nothing answers
                guest.request(rid, 0, client_packet())
                guest.send(health_frame())
                guest.send(health_frame())
                await asyncio.sleep(0.6)
            guest.send(health_frame())
        finally:
            relay.proc.send_signal(signal.SIGCONT)
        for rid in (10, 11, 12):
            frame = await guest.recv(5)
            code, message = framing.parse_error(frame)
            assert (frame.request_id, code) == (rid, ErrorCode.UPSTREAM_TIMEOUT), message
            assert "stale" in message
        guest.request(20, 0, client_packet())
        frame = await guest.recv(5)
        assert (frame.type, frame.request_id) == (FrameType.NTP_REPLY, 20)
        await guest.close()

    asyncio.run(main())
    st = relay.status()
    up = st["upstreams"][0]
    assert st["relay"]["stale_requests"] == 3 and up["stale"] == 3
    assert up["requests"] == 2 and up["replies"] == 2  # the stale three never left
    ended = up["replies"] + up["timeouts"] + up["cancelled"] + sum(up["errors"].values())
    assert up["requests"] == ended + up["in_flight"]
    assert "health_rate_limited" not in st["relay"]["errors"], st["relay"]["errors"]
    log = relay.stop()
    assert log.count("event loop stood still") == 1, log


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_low_descriptor_limit_is_raised_logged_and_refusals_are_clear(
        relay_process, loop_kind: str) -> None:
    soft, hard = 64, 160
    relay = relay_process(loop_kind, [], nofile=(soft, hard))
    st = relay.status()

    hello = framing.guest_hello("g").encode()

    def first_frame(sock: socket.socket) -> framing.Frame | None:
        decoder = framing.FrameDecoder()
        with contextlib.suppress(BrokenPipeError):  # a refusal may already have closed it
            sock.sendall(hello)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            if frames := decoder.feed(data):
                return frames[0]

    served: list[socket.socket] = []
    refused = 0
    for _ in range(200):  # more guests than the limit allows
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(2)  # an answer either way within 2 s, never silence
        sock.connect(str(relay.sock))
        frame = first_frame(sock)
        assert frame is not None, "closed without a word"
        if frame.type == FrameType.HELLO:
            served.append(sock)
            continue
        assert framing.parse_error(frame)[0] == ErrorCode.BUSY
        refused += 1
        sock.settimeout(2)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # and closed
        sock.close()
    text = relay.metrics_text()
    assert f"timesync_relay_max_fds {float(hard)}" in text
    open_fds = float(re.search(r"^timesync_relay_open_fds (\S+)$", text, re.M).group(1))
    assert len(served) < open_fds <= hard
    # refused while descriptors were left: the loop never failed an accept
    assert "timesync_relay_accept_errors_total{" not in text
    assert f'timesync_relay_errors_total{{reason="fd_limit"}} {float(refused)}' in text
    for sock in served[:20]:
        sock.close()
    time.sleep(0.3)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2)
    sock.connect(str(relay.sock))
    frame = first_frame(sock)
    assert frame is not None and frame.type == FrameType.HELLO  # room again: served
    sock.close()
    for sock in served[20:]:
        sock.close()
    served_n = len(served)
    assert served_n >= 50 and refused >= 50 and served_n + refused == 200
    assert st["relay"]["connections_open"] == 0
    log = relay.stop()
    assert f"descriptor limit {hard}, raised from {soft}" in log
    assert log.count("descriptor limit 160 nearly reached") == 1, log
    assert log.count("descriptors free again") == 1, log
    assert "Traceback" not in log
    print(f"\n{loop_kind}: soft limit {soft} -> {hard}: {served_n} guests served, "
          f"{refused} refused with BUSY")


def test_accept_failures_are_counted_by_errno_and_logged_once_per_episode(caplog) -> None:
    import errno
    import logging
    from collections import Counter

    from host_relay.descriptors import AcceptWatch

    counts: Counter[str] = Counter()
    other: list[dict] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: other.append(ctx))
        watch = AcceptWatch(counts)
        watch.install()
        for err in (errno.EMFILE, errno.EMFILE, errno.ENFILE):  # what asyncio reports
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(err, os.strerror(err))})
        loop.call_exception_handler({"message": "something else"})
        watch.accepted()
        loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                     "exception": OSError(errno.ENOBUFS, "no buffers")})
        watch.uninstall()

    with caplog.at_level(logging.WARNING, logger="host_relay"):
        asyncio.run(main())
    assert counts == {"EMFILE": 2, "ENFILE": 1, "ENOBUFS": 1}
    assert [c["message"] for c in other] == ["something else"]  # passed on untouched
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events == ["accept_failing", "accept_recovered", "accept_failing"]


def test_status_relay_table_shows_reach(relay_process, chrony_server) -> None:  # noqa: F811
    relay = relay_process("asyncio", ["--upstream", chrony_server.address,
                                      "--upstream", "udp:127.0.0.1:9"])

    async def main() -> None:
        guest = await Guest.connect(f"unix:{relay.sock}")
        for rid in range(3):
            guest.request(rid, 0, client_packet())
            guest.request(100 + rid, 1, client_packet())
            await guest.recv()
            await guest.recv()
        await guest.close()

    asyncio.run(main())
    table = format_relay_status(relay.status()).splitlines()
    good = next(line for line in table if line.startswith(chrony_server.address))
    bad = next(line for line in table if line.startswith("*udp:127.0.0.1:9"))
    assert good.split()[1] == "007" and good.split()[2].endswith("s")
    assert bad.split()[1] == "000" and bad.split()[2] == "-"
