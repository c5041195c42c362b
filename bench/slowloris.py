"""Slowloris against a local endpoint: hold N connections, each dribbling one byte per interval
of a request head that never ends, reconnecting whenever the server drops one.

    python bench/slowloris.py --target tcp:127.0.0.1:9123 --connections 100 --duration 30
    python bench/slowloris.py --target unix:/run/timesync/status.sock --connections 100

Prints ``ready`` once every connection is open, then at the end one JSON line: connections
opened in all and how many the server dropped. Bounded by ``--duration``; loopback and Unix
sockets only.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time

_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000


def _open(target: str) -> socket.socket:
    kind, _, rest = target.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(rest)
    elif kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise SystemExit("slowloris: loopback targets only")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=2)
    else:
        raise SystemExit(f"slowloris: unknown target {target!r} (unix:PATH or tcp:HOST:PORT)")
    sock.setblocking(False)
    return sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between bytes")
    ap.add_argument("--duration", type=float, default=30.0)
    args = ap.parse_args()
    sel = selectors.DefaultSelector()
    conns: dict[socket.socket, int] = {}  # socket -> bytes of the head sent so far
    opened = dropped = failed = 0
    end = time.monotonic() + min(args.duration, 600)
    announced = False
    next_round = time.monotonic()
    while time.monotonic() < end:
        while len(conns) < args.connections:
            try:
                sock = _open(args.target)
            except OSError:
                failed += 1
                break
            conns[sock] = 0
            sel.register(sock, selectors.EVENT_READ)
            opened += 1
        if not announced and len(conns) >= args.connections:
            print("ready", flush=True)
            announced = True
        now = time.monotonic()
        if now >= next_round:
            next_round = now + args.interval
            for sock, sent in list(conns.items()):
                try:
                    sock.send(_HEAD[sent:sent + 1])
                    conns[sock] = (sent + 1) % len(_HEAD)
                except OSError:
                    sel.unregister(sock)
                    sock.close()
                    del conns[sock]
                    dropped += 1
        for key, _ in sel.select(timeout=max(0.0, min(next_round - time.monotonic(), 0.05))):
            sock = key.fileobj  # the server answered (timeout) or closed: drop and reconnect
            assert isinstance(sock, socket.socket)
            try:
                sock.recv(65536)
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()
            del conns[sock]
            dropped += 1
    for sock in conns:
        sock.close()
    print(json.dumps({"opened": opened, "dropped_by_server": dropped, "connect_failed": failed}),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
