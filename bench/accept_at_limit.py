"""What a guest sees when the relay is at its descriptor limit in a way its budget cannot
foresee (the soft limit lowered under it with prlimit(2); ENFILE behaves alike), under both
event loops, and what the relay counts. Prints one line per loop and phase.

    python bench/accept_at_limit.py

Each phase connects a few guests (HELLO sent) and classifies the first thing each one sees
within 2 s: the relay's HELLO (served), an ERROR frame (refused with a word), a closed or
reset connection (refused), or nothing (waiting in the listen backlog: silent). Bounded: two
relays, about 30 connections each, under 30 s in all.
"""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_relay_process_faults import RelayProcess  # noqa: E402

from timesyncd import framing  # noqa: E402
from timesyncd.framing import FrameType  # noqa: E402

HELLO = framing.json_frame(FrameType.HELLO, 0, {"version": 1, "name": "bench"}).encode()


def probe(path: Path, n: int, wait_s: float = 2.0) -> tuple[list[socket.socket], Counter[str]]:
    socks: list[socket.socket] = []
    seen: Counter[str] = Counter()
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        socks.append(s)
        try:
            s.connect(str(path))
            s.send(HELLO)
        except BlockingIOError:
            pass
        except OSError as exc:
            seen[f"connect {type(exc).__name__}"] += 1
            continue
    deadline = time.monotonic() + wait_s
    for s in socks:
        if s.fileno() < 0:
            continue
        ready, _, _ = select.select([s], [], [], max(deadline - time.monotonic(), 0.01))
        if not ready:
            seen["silent"] += 1
            continue
        try:
            data = s.recv(4096)
        except OSError:
            seen["reset"] += 1
            continue
        frames = framing.FrameDecoder().feed(data) if data else []
        seen[FrameType(frames[0].type).name if frames else "closed"] += 1
    return socks, seen


def run(loop: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="accept-limit-"))
    relay = RelayProcess(tmp, loop, [], (64, 1024))
    held: list[socket.socket] = []
    try:
        socks, seen = probe(relay.sock, 20)
        held += socks
        print(f"{loop:8s} below the limit: {dict(seen)}")
        fds = len(os.listdir(f"/proc/{relay.proc.pid}/fd"))
        resource.prlimit(relay.proc.pid, resource.RLIMIT_NOFILE, (fds, 1024))
        socks, seen = probe(relay.sock, 10)
        held += socks
        print(f"{loop:8s} soft limit lowered to the {fds} open: {dict(seen)}")
        resource.prlimit(relay.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
        time.sleep(1.5)  # asyncio retries a failed accept after 1 s
        socks, seen = probe(relay.sock, 5)
        held += socks
        print(f"{loop:8s} limit raised again: {dict(seen)}")
        text = relay.metrics_text()
        counted = re.findall(r'^timesync_relay_accept_errors_total\{errno="(\w+)"\} (\S+)$',
                             text, re.M)
        print(f"{loop:8s} timesync_relay_accept_errors_total: {counted or 'none'}")
    finally:
        for s in held:
            s.close()
        log = relay.stop()
    lines = [ln for ln in log.splitlines() if "accept" in ln]
    print(f"{loop:8s} accept log lines: {len(lines)}")


def main() -> None:
    for loop in ("uvloop", "asyncio"):
        run(loop)


if __name__ == "__main__":
    main()
