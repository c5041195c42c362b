"""Benchmark load generator: closed-loop NTP exchanges from one process, over epoll.

Run in its own process so it never competes inside the event loop it measures. Each
connection keeps exactly one request in flight (a guest's pattern, and the only one socat can
carry: it forwards raw bytes, so pipelined requests could coalesce into one datagram).

Modes (what one "exchange" is):

- ``udp``:    a 48-byte NTP request straight to the upstream over a connected UDP socket.
- ``socat``:  raw 48-byte request written to a Unix stream socat forwards to UDP; 48-byte reply.
- ``relay``:  the relay protocol: HELLO once per connection, then NTP_REQUEST frames
              (57 bytes) answered by NTP_REPLY frames (64 bytes).
- ``churn-socat`` / ``churn-relay``: a new connection per exchange (relay: connect, HELLO,
              HELLO reply, request, reply, close); latency is measured from ``connect``.

Prints one JSON object: exchanges/s in the measured window, latency percentiles (us), errors
by reason, how many connections got at least one valid reply in the window (steady modes),
CPU use (fraction of one core) of watched processes, optional RSS of one process.
Bounded by ``--warmup + --seconds`` plus a short drain.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import select
import socket
import struct
import sys
import time
from array import array
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procstat  # noqa: E402

_HDR = struct.Struct("!BBHI")  # timesyncd.framing.HEADER: version, type, length, request id
_HELLO, _NTP_REQUEST, _NTP_REPLY, _ERROR = 1, 2, 3, 4
_HELLO_FRAME = (lambda p: _HDR.pack(1, _HELLO, len(p), 0) + p)(
    json.dumps({"version": 1, "name": "bench"}).encode())
_DRAIN_S = 2.0


class Requests:
    """48-byte client requests with unique transmit timestamps (the relay matches replies by
    them), and the matching check on replies."""

    def __init__(self) -> None:
        self._next = random.getrandbits(62) | 1
        self._packet = bytearray(48)
        self._packet[0] = 0x23  # LI 0, version 4, mode 3
        self._packet[2] = 4  # poll
        self._packet[3] = 0xEC  # precision -20

    def make(self) -> tuple[bytes, bytes]:
        self._next += 1
        cookie = self._next.to_bytes(8, "big")
        self._packet[40:48] = cookie
        return bytes(self._packet), cookie


def _frame(ftype: int, rid: int, payload: bytes) -> bytes:
    return _HDR.pack(1, ftype, len(payload), rid) + payload


def _take_frame(buf: bytearray) -> tuple[int, int, bytes] | None:
    if len(buf) < 8:
        return None
    _, ftype, length, rid = _HDR.unpack_from(buf)
    end = 8 + length
    if len(buf) < end:
        return None
    payload = bytes(buf[8:end])
    del buf[:end]
    return ftype, rid, payload


def _reply_ok(packet: bytes, cookie: bytes) -> bool:
    return len(packet) >= 48 and packet[0] & 7 == 4 and packet[24:32] == cookie


class Conn:
    __slots__ = ("sock", "buf", "cookie", "rid", "t0", "phase", "answered")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.cookie = b""
        self.rid = 0
        self.t0 = 0
        self.phase = 0  # churn-relay: 0 waiting for HELLO, 1 waiting for the reply
        self.answered = 0  # valid replies inside the measured window


class Run:
    """Shared bookkeeping: measured window, latencies, errors, CPU of watched processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.requests = Requests()
        self.latencies = array("q")
        self.errors: Counter[str] = Counter()
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.watch: dict[str, int] = dict(_parse_watch(w) for w in args.watch)
        now = time.perf_counter_ns()
        self.t_window = now + int(args.warmup * 1e9)
        self.t_end = self.t_window + int(args.seconds * 1e9)
        self.in_window = False
        self.cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.window_ns = 0
        self.rid = 0
        self.stopping = False  # past the window: finish what is in flight, start nothing
        self._hard_end = self.t_end + int(_DRAIN_S * 1e9)

    def poll(self, timeout_s: float, in_flight: int) -> list[Conn] | None:
        """Wait for readable connections and return them. Past the window ``stopping`` is set;
        past the drain deadline the ``in_flight`` exchanges count as unanswered and None
        says to give up."""
        events = self.ep.poll(timeout_s)
        now = time.perf_counter_ns()
        self.tick(now)
        if now >= self.t_end:
            self.stopping = True
            if now >= self._hard_end:
                self.errors["unanswered"] += in_flight
                return None
        return [c for fd, _ in events if (c := self.conns.get(fd)) is not None]

    def read(self, conn: Conn) -> bytes | None:
        """What the peer sent (b"" once it closed or failed, the error counted by errno);
        None when nothing is there after all."""
        try:
            return conn.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.errors[errno.errorcode.get(exc.errno or 0, "oserror")] += 1
            return b""

    def tick(self, now: int) -> None:
        if not self.in_window and now >= self.t_window and not self.cpu0:
            self.in_window = True
            self.cpu0 = self._cpu_now()
            self.t_window = now
        elif self.in_window and now >= self.t_end:
            self.in_window = False
            cpu1 = self._cpu_now()
            span = (now - self.t_window) / 1e9
            self.window_ns = now - self.t_window
            self.cpu = {k: round((cpu1[k] - self.cpu0[k]) / span, 3) for k in cpu1}

    def _cpu_now(self) -> dict[str, float]:
        out = {"loadgen": sum(os.times()[:2])}
        for name, pid in self.watch.items():
            try:
                out[name] = procstat.tree_cpu_seconds(pid)
            except OSError:
                out[name] = float("nan")
        return out

    def record(self, t0: int, now: int) -> None:
        if self.in_window:
            self.latencies.append(now - t0)

    def close(self, conn: Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.ep.unregister(conn.sock.fileno())
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def result(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        span = self.window_ns / 1e9 or self.args.seconds

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1000, 1) if lat else None

        return {
            "mode": self.args.mode, "conns": self.args.conns, "window_s": round(span, 3),
            "exchanges": len(lat), "rate": round(len(lat) / span, 1),
            "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": pct(1.0),
            "errors": dict(self.errors), "cpu": self.cpu,
        }


def _parse_watch(spec: str) -> tuple[str, int]:
    name, _, pid = spec.partition("=")
    return name, int(pid)


# --- steady: long-lived connections ----------------------------------------------------


def _open_steady(args: argparse.Namespace) -> socket.socket:
    if args.mode == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", args.udp_port))
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10.0)
    for _ in range(2000):  # socat listens with a backlog of 5: retry while it forks
        try:
            sock.connect(args.path)
            break
        except BlockingIOError:
            time.sleep(0.005)
    else:
        raise ConnectionError(f"could not connect to {args.path}: listen backlog stays full")
    if args.mode == "relay":
        sock.sendall(_HELLO_FRAME)
        buf = bytearray()
        while (frame := _take_frame(buf)) is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("relay closed the connection during HELLO")
            buf += data
        if frame[0] != _HELLO:
            raise ConnectionError(f"relay answered HELLO with frame type {frame[0]}")
    return sock


def _send_steady(run: Run, conn: Conn) -> None:
    packet, conn.cookie = run.requests.make()
    if run.args.mode == "relay":
        run.rid = (run.rid + 1) & 0xFFFFFFFF
        conn.rid = run.rid
        packet = _frame(_NTP_REQUEST, conn.rid, b"\x00" + packet)
    conn.t0 = time.perf_counter_ns()
    conn.sock.send(packet)


def _take_reply(run: Run, conn: Conn) -> bytes | None:
    """One whole reply from ``conn.buf`` (NTP packet), or None if incomplete."""
    if run.args.mode in ("udp", "socat", "churn-socat"):
        if len(conn.buf) < 48:
            return None
        packet = bytes(conn.buf[:48])
        del conn.buf[:48]
        return packet
    frame = _take_frame(conn.buf)
    if frame is None:
        return None
    ftype, rid, payload = frame
    if ftype == _ERROR:
        code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else -1
        run.errors[f"relay_error_{code}"] += 1
        return b""
    if ftype != _NTP_REPLY or rid != conn.rid:
        run.errors["unexpected_frame"] += 1
        return b""
    return payload[8:]


def run_steady(args: argparse.Namespace) -> dict[str, Any]:
    socks = [_open_steady(args) for _ in range(args.conns)]
    run = Run(args)
    rss: dict[str, int] = {}
    if args.rss_pid:
        rss["after_connect_kib"] = procstat.status_kib(args.rss_pid)
    for sock in socks:
        sock.setblocking(False)
        conn = Conn(sock)
        run.conns[sock.fileno()] = conn
        run.ep.register(sock.fileno(), select.EPOLLIN)
    for conn in run.conns.values():
        _send_steady(run, conn)
    outstanding = len(run.conns)
    perf = time.perf_counter_ns
    while outstanding:
        polled = run.poll(0.2, outstanding)
        if polled is None:
            break
        for conn in polled:
            data = run.read(conn)
            if data is None:
                continue
            now = perf()
            if not data:
                run.errors["closed_by_peer"] += 1
                outstanding -= 1
                run.close(conn)
                continue
            conn.buf += data
            while (packet := _take_reply(run, conn)) is not None:
                if packet and not _reply_ok(packet, conn.cookie):
                    run.errors["bad_reply"] += 1
                elif packet:
                    run.record(conn.t0, now)
                    conn.answered += run.in_window
                if run.stopping:
                    outstanding -= 1
                else:
                    _send_steady(run, conn)
    if args.rss_pid:
        rss["after_traffic_kib"] = procstat.status_kib(args.rss_pid)
        rss["hwm_kib"] = procstat.status_kib(args.rss_pid, "VmHWM")
    answered = [c.answered for c in run.conns.values()]
    for conn in list(run.conns.values()):
        run.close(conn)
    out = run.result()
    # every connection must keep being answered, not just the total: the scale check
    out["answered_conns"] = sum(1 for n in answered if n)
    out["min_replies_per_conn"] = min(answered, default=0)
    if rss:
        out["rss"] = rss
    return out


# --- churn: one connection per exchange -----------------------------------------------


def run_churn(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    relay = args.mode == "churn-relay"
    perf = time.perf_counter_ns
    to_start = args.conns
    active = 0

    def start_one() -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        t0 = perf()
        try:
            sock.connect(args.path)
        except BlockingIOError:  # listen backlog full: retry on the next loop turn
            sock.close()
            run.errors["connect_eagain"] += 1
            return False
        conn = Conn(sock)
        conn.t0 = t0
        run.conns[sock.fileno()] = conn
        run.ep.register(sock.fileno(), select.EPOLLIN)
        if relay:
            sock.send(_HELLO_FRAME)
        else:
            packet, conn.cookie = run.requests.make()
            sock.send(packet)
        return True

    while True:
        while to_start and not run.stopping:
            if not start_one():
                break
            to_start -= 1
            active += 1
        if not active and (run.stopping or to_start == 0):
            break
        polled = run.poll(0.001 if to_start else 0.2, active)
        if polled is None:
            break
        for conn in polled:
            data = run.read(conn)
            if data is None:
                continue
            now = perf()
            done = False
            if not data:
                run.errors["closed_by_peer"] += 1
                done = True
            else:
                conn.buf += data
                if relay and conn.phase == 0:
                    frame = _take_frame(conn.buf)
                    if frame is not None:
                        if frame[0] != _HELLO:
                            run.errors["bad_hello"] += 1
                            done = True
                        else:
                            conn.phase = 1
                            packet, conn.cookie = run.requests.make()
                            run.rid = (run.rid + 1) & 0xFFFFFFFF
                            conn.rid = run.rid
                            conn.sock.send(_frame(_NTP_REQUEST, conn.rid, b"\x00" + packet))
                if not done and (not relay or conn.phase == 1):
                    reply = _take_reply(run, conn)
                    if reply is not None:
                        done = True
                        if reply and _reply_ok(reply, conn.cookie):
                            run.record(conn.t0, now)
                        elif reply:
                            run.errors["bad_reply"] += 1
            if done:
                run.close(conn)
                active -= 1
                if not run.stopping:
                    to_start += 1
    for conn in list(run.conns.values()):
        run.close(conn)
    return run.result()


def main() -> int:
    ap = argparse.ArgumentParser(description="closed-loop NTP load generator (see module doc)")
    ap.add_argument("--mode", required=True,
                    choices=["udp", "socat", "relay", "churn-socat", "churn-relay"])
    ap.add_argument("--path", help="Unix socket of socat or the relay")
    ap.add_argument("--udp-port", type=int, help="upstream port on 127.0.0.1 (mode udp)")
    ap.add_argument("--conns", type=int, default=1, help="concurrent connections (guests)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured lead-in")
    ap.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                    help="report CPU use of this process (and its children) in the window")
    ap.add_argument("--rss-pid", type=int, default=0,
                    help="report VmRSS of this process after connecting and after traffic")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.conns + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.conns + 1024), hard))
    result = run_churn(args) if args.mode.startswith("churn") else run_steady(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
