"""Issue 18's table in one command: true offset of a software-clock guest direct vs through the
relay, idle and with host CPU load, against a real ``chronyd -x`` upstream on loopback.

    python bench/relay_accuracy.py                 # 90 s per cell after sync, 3 busy loops
    python bench/relay_accuracy.py --seconds 30    # shorter
    python bench/relay_accuracy.py --legs 200      # also the per-leg breakdown (probe client)

Each cell starts a fresh guest (``--clock software --software-freq-ppm 50``, default polls)
either with ``--server udp:`` (direct) or ``--relay unix:`` (a relay listening on a unix
socket, chronyd its one upstream), waits until ``timesync status --json`` says synchronised,
then reads ``true_offset_s`` and ``error_bound_s`` once a second. "loaded" runs N busy-loop
processes (bounded: each exits by itself after the cell, and is killed in ``finally``).

``--legs``: a probe client speaks the relay protocol itself and, for each exchange, splits the
round trip with the server's own stamps (same machine clock): outbound = t2 - t1, inbound =
t4 - t3, the relay's reported residence per direction, and what remains unmeasured per
direction (the asymmetry the guest cannot see).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chrony_fixture import chronyd  # noqa: E402

from timesyncd import framing  # noqa: E402
from timesyncd.framing import FrameDecoder, FrameType  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TIMESYNC = [sys.executable, "-c", "from timesyncd.cli import main; main()"]
NTP_UNIX = 2_208_988_800


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def busy_loops(n: int, max_s: float) -> Iterator[None]:
    """``n`` CPU-bound processes, each ending by itself after ``max_s``; killed on exit."""
    code = f"import time\nend=time.monotonic()+{max_s}\nwhile time.monotonic()<end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(5)


@contextlib.contextmanager
def relay(tmp: Path, upstream: str, extra: list[str]) -> Iterator[Path]:
    sock = tmp / "relay.sock"
    log = open(tmp / "relay.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*TIMESYNC, "relay", "--listen", f"unix:{sock}", "--upstream",
                             upstream, *extra], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("relay did not start: " + (tmp / "relay.log").read_text())
            time.sleep(0.05)
        yield sock
    finally:
        _stop(proc)
        log.close()


#: ``cli``: read the status as the issue did, a ``timesync status --json`` process a second;
#: ``socket``: the same query from this process (no Python start-up, ~0.1 s of CPU on 2 vCPUs,
#: competing with the daemons once a second)
STATUS_VIA = ["cli"]


def status(sock: Path) -> dict[str, Any] | None:
    if STATUS_VIA[0] == "socket":
        from guest_client.status_server import query_status
        try:
            return query_status(str(sock))
        except (OSError, ValueError):
            return None
    res = subprocess.run([*TIMESYNC, "status", "--socket", str(sock), "--json"],
                         capture_output=True, text=True, env=ENV, timeout=20)
    try:
        return json.loads(res.stdout) if res.returncode == 0 else None
    except ValueError:
        return None


def run_cell(tmp: Path, source: list[str], seconds: float, sync_timeout: float,
             guest_extra: list[str]) -> dict[str, Any]:
    st_sock = tmp / "guest.sock"
    log = open(tmp / "guest.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*TIMESYNC, "guest", *source, "--clock", "software",
                             "--software-freq-ppm", "50", "--status-socket", str(st_sock),
                             *guest_extra], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    rows: list[tuple[float, float]] = []
    try:
        deadline = time.monotonic() + sync_timeout
        while time.monotonic() < deadline:
            st = status(st_sock) if st_sock.exists() else None
            if st is not None and st.get("state") == "synchronised":
                break
            time.sleep(1)
        else:
            raise RuntimeError("guest did not synchronise: "
                               + (tmp / "guest.log").read_text()[-2000:])
        end = time.monotonic() + seconds
        nxt = time.monotonic()
        while nxt < end:
            st = status(st_sock)
            if st is not None and st.get("true_offset_s") is not None:
                rows.append((st["true_offset_s"], st.get("error_bound_s") or math.inf))
            nxt += 1.0
            time.sleep(max(nxt - time.monotonic(), 0))
    finally:
        _stop(proc)
        log.close()
    offs = [o for o, _ in rows]
    return {"n": len(rows),
            "rms_us": math.sqrt(sum(o * o for o in offs) / len(offs)) * 1e6,
            "mean_us": statistics.fmean(offs) * 1e6,
            "max_us": max(abs(o) for o in offs) * 1e6,
            "outside": sum(1 for o, b in rows if abs(o) > b),
            "median_bound_us": statistics.median(b for _, b in rows) * 1e6}


def _ntp_ts(raw: bytes) -> int:
    sec, frac = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big")
    return (sec - NTP_UNIX) * 1_000_000_000 + (frac * 1_000_000_000 >> 32)


def probe_legs(sock: Path, count: int, interval: float, per_round: int = 1) -> dict[str, float]:
    """Exchanges through the relay, split per direction with the server's own stamps.

    ``per_round`` exchanges go back to back each round (each sent the moment the previous
    reply is read, as the guest's follow-ups are): the first one's legs keep the plain key
    names, the last one's get ``warm_``, and ``best_asym_*`` is the asymmetry of each round's
    least-delay exchange (what the guest uses with ``relay_poll_exchanges``).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    dec = FrameDecoder()

    def frames() -> list[framing.Frame]:
        while True:
            data = s.recv(65536)
            if not data:
                raise RuntimeError("relay closed the probe")
            got = dec.feed(data)
            if got:
                return got

    def exchange(rid: int) -> dict[str, float] | None:
        pkt = bytes([0x23]) + bytes(39) + os.urandom(8)
        t1 = time.time_ns()
        s.sendall(framing.ntp_request(rid, 0, pkt).encode())
        got = frames()
        t4 = time.time_ns()
        if got[0].type != FrameType.NTP_REPLY:
            return None
        reply, r_in, r_out = framing.parse_ntp_reply(got[0])
        t2, t3 = _ntp_ts(reply[32:40]), _ntp_ts(reply[40:48])
        out, inb = t2 - t1, t4 - t3
        if not 0 < t4 - t1 < 1_000_000_000 or abs(out) > 1_000_000_000:
            return None  # an unsynchronised reply: not a sample
        return {k: v / 1e3 for k, v in (("rtt", t4 - t1 - (t3 - t2)), ("out", out), ("in", inb),
                                        ("r_in", r_in), ("r_out", r_out),
                                        ("hid_out", out - r_in), ("hid_in", inb - r_out))}

    s.sendall(framing.json_frame(FrameType.HELLO, 0, {"version": 1, "name": "probe"}).encode())
    frames()
    rounds: list[list[dict[str, float]]] = []
    rid = 0
    try:
        for _ in range(count):
            got = []
            for _ in range(per_round):
                rid += 1
                row = exchange(rid)
                if row is not None:
                    got.append(row)
            if len(got) == per_round:
                rounds.append(got)
            time.sleep(interval)
    finally:
        s.close()

    def asym(r: dict[str, float]) -> float:
        return (r["hid_out"] - r["hid_in"]) / 2

    res: dict[str, float] = {}
    for prefix, rows in (("", [r[0] for r in rounds]), ("warm_", [r[-1] for r in rounds])):
        if prefix and per_round == 1:
            continue
        for k in rows[0]:
            vals = sorted(r[k] for r in rows)
            res[f"{prefix}{k}_median_us"] = statistics.median(vals)
            res[f"{prefix}{k}_p90_us"] = vals[int(0.9 * len(vals))]
        res[f"{prefix}asym_mean_us"] = statistics.fmean(asym(r) for r in rows)
        res[f"{prefix}asym_rms_us"] = math.sqrt(statistics.fmean(asym(r) ** 2 for r in rows))
    best = [asym(min(r, key=lambda x: x["rtt"] - x["r_in"] - x["r_out"])) for r in rounds]
    res["best_asym_mean_us"] = statistics.fmean(best)
    res["best_asym_rms_us"] = math.sqrt(statistics.fmean(b * b for b in best))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90, help="samples per cell after sync")
    ap.add_argument("--sync-timeout", type=float, default=240)
    ap.add_argument("--busy", type=int, default=3, help="busy loops in the loaded cells")
    ap.add_argument("--legs", type=int, default=0, help="probe rounds per load (0: skip)")
    ap.add_argument("--legs-per-round", type=int, default=3,
                    help="exchanges back to back per probe round (the guest's default poll)")
    ap.add_argument("--relay-arg", action="append", default=[], help="extra relay option")
    ap.add_argument("--guest-arg", action="append", default=[], help="extra guest option")
    ap.add_argument("--only", choices=("direct", "relay"), help="run one path only")
    ap.add_argument("--status-via", choices=("cli", "socket"), default="cli",
                    help="read the guest's status with a CLI process (as the issue did) or "
                         "from this process over the status socket")
    args = ap.parse_args()
    STATUS_VIA[0] = args.status_via
    out: dict[str, Any] = {}
    with chronyd(stratum=2) as server, tempfile.TemporaryDirectory(prefix="relacc-") as t:
        tmp = Path(t)
        with relay(tmp, server.address, args.relay_arg) as rsock:
            for load in ("idle", "loaded"):
                n = args.busy if load == "loaded" else 0
                cell_max = args.sync_timeout + args.seconds + 30
                with busy_loops(n, cell_max):
                    if args.legs:
                        out[f"legs {load}"] = probe_legs(rsock, args.legs, 0.05,
                                                           args.legs_per_round)
                        print(f"legs {load}: " + json.dumps(
                            {k: round(v, 1) for k, v in out[f"legs {load}"].items()}),
                            flush=True)
                    for path in ("direct", "relay"):
                        if args.only and path != args.only:
                            continue
                        src = ["--server", server.address] if path == "direct" else \
                            ["--relay", f"unix:{rsock}"]
                        r = run_cell(tmp, src, args.seconds, args.sync_timeout, args.guest_arg)
                        out[f"{path} {load}"] = r
                        print(f"{path:6} {load:6} RMS {r['rms_us']:8.1f} us  mean "
                              f"{r['mean_us']:+8.1f} us  max {r['max_us']:8.1f} us  outside "
                              f"bound {r['outside']} of {r['n']}  (median bound "
                              f"{r['median_bound_us']:.0f} us)", flush=True)
    print()
    print("| path | CPU load | RMS true offset | mean | max | outside the bound | median bound |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key, r in out.items():
        if key.startswith("legs"):
            continue
        path, load = key.split()
        print(f"| {path} | {load if load == 'idle' else f'{args.busy} busy loops'} | "
              f"{r['rms_us']:.1f} us | {r['mean_us']:+.1f} us | {r['max_us']:.0f} us | "
              f"{r['outside']} of {r['n']} | {r['median_bound_us']:.0f} us |")
    d, rl = out.get("direct idle"), out.get("relay idle")
    if d and rl:
        print(f"\nidle relay/direct RMS ratio {rl['rms_us'] / d['rms_us']:.2f} (target <= 1.5), "
              f"|mean| {abs(rl['mean_us']):.1f} us (target <= 10)")
    rld = out.get("relay loaded")
    if rld:
        print(f"loaded relay RMS {rld['rms_us']:.1f} us (target <= 100), outside bound "
              f"{rld['outside']} (target 0)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
