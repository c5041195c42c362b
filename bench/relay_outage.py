"""Upstream outages the suite is too short for: a real chronyd behind a relay (its own process,
each event loop) is stopped for 5 s and for 60 s, then restarted on its port; a probe guest
asks once per second. Prints, per loop and outage, how long after chronyd answered again the
relay's guests got replies, and the relay's accounting identity from /status.

    python bench/relay_outage.py                  # 5 s and 60 s, both loops (~3 minutes)
    python bench/relay_outage.py --outages 5 --loops uvloop

Loopback only; chronyd runs with -x (never touches the clock). Bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from chrony_fixture import chronyd  # noqa: E402
from relay_helpers import Guest, client_packet  # noqa: E402

from host_relay.relay_query import query_relay  # noqa: E402
from timesyncd.framing import FrameType  # noqa: E402

TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def probe(guest: Guest, rid: int) -> bool:
    guest.request(rid, 0, client_packet())
    try:
        frame = await guest.recv(3.0)
    except TimeoutError:
        return False
    return frame.type == FrameType.NTP_REPLY


async def one(loop: str, outage_s: float, tmp: Path) -> dict[str, float | int | str]:
    metrics = f"127.0.0.1:{free_tcp_port()}"
    sock = tmp / f"relay-{loop}-{outage_s:g}.sock"
    with contextlib.ExitStack() as stack:
        first = contextlib.ExitStack()
        server = first.enter_context(chronyd())
        stack.push(first)
        relay = subprocess.Popen(
            [*TIMESYNC, "--loop", loop, "relay", "--listen", f"unix:{sock}", "--upstream",
             server.address, "--upstream-timeout-s", "1", "--metrics", f"tcp:{metrics}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(relay.wait, 10)
        stack.callback(relay.send_signal, signal.SIGTERM)
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.1)
        guest = await Guest.connect(f"unix:{sock}")
        rid = 0
        assert await probe(guest, rid), "no reply before the outage"
        first.close()  # chronyd stops: the outage begins
        stop = time.monotonic()
        while time.monotonic() - stop < outage_s:
            rid += 1
            await probe(guest, rid)
            await asyncio.sleep(1.0)
        stack.enter_context(chronyd(port=server.port))  # back on its port
        up = time.monotonic()
        recovered = None
        while time.monotonic() - up < 30:
            rid += 1
            if await probe(guest, rid):
                recovered = time.monotonic() - up
                break
            await asyncio.sleep(0.2)
        st = query_relay(metrics)["upstreams"][0]
        await guest.close()
    ended = st["replies"] + st["timeouts"] + st["cancelled"] + sum(st["errors"].values())
    return {"loop": loop, "outage_s": outage_s,
            "recovered_s": "never (30 s)" if recovered is None else f"{recovered:.2f} s",
            "requests": st["requests"], "ended": ended, "in_flight": st["in_flight"],
            "identity": "holds" if st["requests"] == ended + st["in_flight"] else "BROKEN"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outages", type=float, nargs="+", default=[5.0, 60.0])
    ap.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"])
    args = ap.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="relay-outage-"))
    print("| loop | outage | replies again after chronyd is back | requests | ended | "
          "in flight | identity |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for outage in args.outages:
        for loop in args.loops:
            r = asyncio.run(one(loop, min(outage, 120.0), tmp))
            print(f"| {r['loop']} | {r['outage_s']:g} s | {r['recovered_s']} | "
                  f"{r['requests']} | {r['ended']} | {r['in_flight']} | {r['identity']} |",
                  flush=True)


if __name__ == "__main__":
    main()
