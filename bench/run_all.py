"""Relay and guest benchmarks in one invocation; prints Markdown tables with ratios.

The machine is shared and noisy, so every figure is compared with a baseline measured in the
same invocation against the same upstream (a fast UDP NTP responder, ``ntp_responder.py``, in
its own process): the upstream queried directly, socat doing the same forwarding, and the
relay (``timesync relay`` on uvloop, in its own process). Cases are interleaved and repeated;
the tables show the median of the repeats. Load comes from ``loadgen.py`` processes.

    python bench/run_all.py                      # everything, about 3.5 minutes
    python bench/run_all.py --skip-guest --repeats 1 --seconds 2   # quick look

Bounded: every child process has a lifetime limit or is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import procstat  # noqa: E402

#: ``timesync`` from this checkout, whatever is installed.
TIMESYNC = [sys.executable, "-c", "import sys; from timesyncd.cli import main; sys.exit(main())"]
#: The relay's per-connection rate limit (16/s by default) would cap a closed loop; lift it.
RELAY_BENCH_FLAGS = ["--rate-limit", "1000000", "--rate-burst", "1000000"]


class Procs:
    """Children started by this run; all are terminated (then killed) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, cwd=REPO, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def wait_unix(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(str(path))
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {path} after {timeout}s")


def start_responder(procs: Procs, lifetime_s: float) -> tuple[subprocess.Popen[bytes], int]:
    proc = procs.start([sys.executable, str(HERE / "ntp_responder.py"),
                        "--max-seconds", str(lifetime_s)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    check_responder(port)
    return proc, port


def check_responder(port: int) -> None:
    """One exchange through the project's own client checks: the replies are valid NTP."""
    from timesyncd.exchange import ClientExchange, Sample

    ex = ClientExchange()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        s.send(ex.request(int.from_bytes(os.urandom(8), "big") | 1, time.time_ns()))
        result = ex.receive(s.recv(2048), time.time_ns())
    if not isinstance(result, Sample):
        raise RuntimeError(f"responder reply rejected: {result}")


def relay_argv(listen: Path, port: int, *extra: str) -> list[str]:
    return [*TIMESYNC, "--loop", "uvloop", "--log-level", "warning", "relay",
            "--listen", f"unix:{listen}", "--upstream", f"udp:127.0.0.1:{port}",
            *RELAY_BENCH_FLAGS, *extra]


def start_relay(procs: Procs, tmp: Path, port: int, name: str,
                *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    path = tmp / f"{name}.sock"
    with open(tmp / f"{name}.log", "wb") as log:  # its warnings (e.g. upstream timeouts)
        proc = procs.start(relay_argv(path, port, *extra), stderr=log)
    wait_unix(path, proc)
    return proc, path


def start_socat(procs: Procs, tmp: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    path = tmp / "socat.sock"
    proc = procs.start(["socat", f"UNIX-LISTEN:{path},fork", f"UDP:127.0.0.1:{port}"])
    wait_unix(path, proc)
    return proc, path


def loadgen(mode: str, conns: int, seconds: float, warmup: float, *, path: Path | None = None,
            udp_port: int = 0, watch: dict[str, int] | None = None,
            rss_pid: int = 0) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "loadgen.py"), "--mode", mode, "--conns", str(conns),
            "--seconds", str(seconds), "--warmup", str(warmup)]
    if path is not None:
        argv += ["--path", str(path)]
    if udp_port:
        argv += ["--udp-port", str(udp_port)]
    for name, pid in (watch or {}).items():
        argv += ["--watch", f"{name}={pid}"]
    if rss_pid:
        argv += ["--rss-pid", str(rss_pid)]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=seconds + warmup + 60,
                         check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    result["loadavg"] = os.getloadavg()[0]
    return result


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def median_cpu(runs: list[dict[str, Any]], name: str) -> float:
    values = [r["cpu"][name] for r in runs if name in r.get("cpu", {})]
    return statistics.median(values) if values else float("nan")


def errors_of(runs: list[dict[str, Any]]) -> str:
    total: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k}={v}" for k, v in sorted(total.items())) or "none"


# --- cases ---------------------------------------------------------------------------------


def bench_forwarding(args: argparse.Namespace, procs: Procs, tmp: Path, port: int,
                     responder_pid: int) -> dict[str, Any]:
    socat, socat_path = start_socat(procs, tmp, port)
    relay, relay_path = start_relay(procs, tmp, port, "relay")
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for conns in (1, 100):
            cases: list[tuple[str, dict[str, Any], dict[str, int]]] = [
                ("udp", {"udp_port": port}, {}),
                ("socat", {"path": socat_path}, {"forwarder": socat.pid}),
                ("relay", {"path": relay_path}, {"forwarder": relay.pid}),
            ]
            for mode, where, watch in cases:
                r = loadgen(mode, conns, args.seconds, args.warmup,
                            watch={"responder": responder_pid, **watch}, **where)
                results.setdefault(f"{mode}/{conns}", []).append(r)
        for mode, path, pid in (("churn-socat", socat_path, socat.pid),
                                ("churn-relay", relay_path, relay.pid)):
            r = loadgen(mode, args.churn_conns, args.seconds, args.warmup, path=path,
                        watch={"responder": responder_pid, "forwarder": pid})
            results.setdefault(f"{mode}/{args.churn_conns}", []).append(r)
    procs.stop(socat)
    procs.stop(relay)
    return results


def bench_scale(args: argparse.Namespace, procs: Procs, tmp: Path, port: int,
                responder_pid: int) -> dict[str, Any]:
    relay, path = start_relay(procs, tmp, port, "relay-scale",
                              "--max-connections", str(args.scale_conns + 100))
    time.sleep(0.5)
    idle_kib = procstat.status_kib(relay.pid)
    r = loadgen("relay", args.scale_conns, args.seconds, args.warmup, path=path,
                watch={"responder": responder_pid, "forwarder": relay.pid}, rss_pid=relay.pid)
    procs.stop(relay)
    r["rss"]["idle_kib"] = idle_kib
    return r


def bench_guest(args: argparse.Namespace, procs: Procs, tmp: Path, port: int) -> dict[str, Any]:
    from guest_client.status_server import query_status

    relay, path = start_relay(procs, tmp, port, "relay-guest")
    status_path = tmp / "guest-status.sock"
    total = args.guest_warmup + args.guest_seconds
    with open(tmp / "guest.log", "wb") as log:
        guest = procs.start([*TIMESYNC, "--log-level", "warning", "guest",
                             "--relay", f"unix:{path}", "--clock", "software",
                             "--minpoll", "4", "--maxpoll", "4", "--name", "bench",
                             "--status-socket", str(status_path)], stderr=log)
    idle = procs.start([sys.executable, "-c", f"import time; time.sleep({total + 30})"])
    t_start = time.monotonic()
    time.sleep(args.guest_warmup)
    cpu0 = procstat.sched_cpu_seconds(guest.pid)
    t0 = time.monotonic()
    time.sleep(args.guest_seconds)
    cpu1 = procstat.sched_cpu_seconds(guest.pid)
    t1 = time.monotonic()
    ticks = procstat.cpu_seconds(guest.pid)
    out: dict[str, Any] = {
        "window_s": round(t1 - t0, 1),
        "cpu_window_s": round(cpu1 - cpu0, 4),
        "cpu_ticks_total_s": ticks,
        "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 4),
        "cpu_total_s": round(cpu1, 3),
        "cpu_total_percent": round(100 * cpu1 / (t1 - t_start), 4),
        "rss_kib": procstat.status_kib(guest.pid),
        "hwm_kib": procstat.status_kib(guest.pid, "VmHWM"),
        "idle_python_rss_kib": procstat.status_kib(idle.pid),
        "relay_rss_kib": procstat.status_kib(relay.pid),
    }
    try:
        st = query_status(str(status_path))
        out["state"] = st.get("state")
        out["samples"] = sum(s.get("samples", 0) for s in st.get("sources", []))
    except OSError as exc:
        out["state"] = f"status query failed: {exc}"
    for proc in (idle, guest, relay):
        procs.stop(proc)
    return out


# --- report ----------------------------------------------------------------------------


def paired_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """Median over repeats of a/b, each pair measured back to back (steadier than a ratio of
    medians when the machine's load shifts between repeats)."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(args: argparse.Namespace, fwd: dict[str, Any] | None, scale: dict[str, Any] | None,
           guest: dict[str, Any] | None) -> Iterator[str]:
    loads = [r["loadavg"] for runs in (fwd or {}).values() for r in runs]
    span = f"{min(loads):.1f}-{max(loads):.1f}" if loads else f"{os.getloadavg()[0]:.1f}"
    yield f"Run: {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, load average " \
          f"{span} during the cases; repeats {args.repeats}, {args.seconds} s measured per case " \
          f"after {args.warmup} s warm-up; medians of the repeats."
    yield ""
    if fwd:
        yield "### Exchanges over Unix sockets (closed loop, one request in flight per guest)"
        yield ""
        yield "| guests | path | exchanges/s | p50 us | p99 us | forwarder CPU | " \
              "responder CPU | client CPU | errors |"
        yield "|---:|---|---:|---:|---:|---:|---:|---:|---|"
        for conns in (1, 100):
            for mode, label in (("udp", "direct UDP"), ("socat", "socat"), ("relay", "relay")):
                runs = fwd[f"{mode}/{conns}"]
                yield (f"| {conns} | {label} | {median(runs, 'rate'):,.0f} | "
                       f"{median(runs, 'p50_us'):,.0f} | {median(runs, 'p99_us'):,.0f} | "
                       f"{median_cpu(runs, 'forwarder'):.2f} | "
                       f"{median_cpu(runs, 'responder'):.2f} | {median_cpu(runs, 'loadgen'):.2f} | "
                       f"{errors_of(runs)} |").replace("| nan |", "| - |")
        yield ""
        yield ("CPU columns: fraction of one core during the window (socat: all its forks). "
               "Ratios below: median over repeats of relay/socat measured back to back.")
        yield ""
        yield "| target | relay | socat | ratio | target | verdict |"
        yield "|---|---:|---:|---:|---|---|"
        for conns in (1, 100):
            relay, socat = fwd[f"relay/{conns}"], fwd[f"socat/{conns}"]
            for key in ("p50_us", "p99_us"):
                r = paired_ratio(relay, socat, key)
                yield (f"| {key[:3]} latency, {conns} guest{'s' if conns > 1 else ''} | "
                       f"{median(relay, key):,.0f} us | {median(socat, key):,.0f} us | "
                       f"{r:.2f}x | <= 1.5x | {verdict(r <= 1.5)} |")
        relay, socat = fwd["relay/100"], fwd["socat/100"]
        r = paired_ratio(relay, socat, "rate")
        yield (f"| throughput, 100 guests | {median(relay, 'rate'):,.0f}/s | "
               f"{median(socat, 'rate'):,.0f}/s | {r:.2f}x | >= 1x | {verdict(r >= 1)} |")
        n = args.churn_conns
        ch_r, ch_s = fwd[f"churn-relay/{n}"], fwd[f"churn-socat/{n}"]
        r = paired_ratio(ch_r, ch_s, "rate")
        yield (f"| connection churn, {n} clients | {median(ch_r, 'rate'):,.0f}/s | "
               f"{median(ch_s, 'rate'):,.0f}/s | {r:.2f}x | >= 5x | {verdict(r >= 5)} |")
        yield ""
        yield (f"Churn latency (connect to reply) p50/p99: relay {median(ch_r, 'p50_us'):,.0f}/"
               f"{median(ch_r, 'p99_us'):,.0f} us, socat {median(ch_s, 'p50_us'):,.0f}/"
               f"{median(ch_s, 'p99_us'):,.0f} us; errors relay: {errors_of(ch_r)}; "
               f"socat: {errors_of(ch_s)}.")
        yield ""
    if scale:
        rss = scale["rss"]
        yield f"### Scale: {scale['conns']} guest connections held open to one relay"
        yield ""
        yield "| figure | value | target | verdict |"
        yield "|---|---:|---|---|"
        yield f"| relay RSS idle | {rss['idle_kib'] / 1024:.1f} MiB | | |"
        mb = rss["after_connect_kib"] / 1024
        yield f"| relay RSS, {scale['conns']} connected | {mb:.1f} MiB | <= 100 MB | " \
              f"{verdict(rss['after_connect_kib'] * 1024 <= 100e6)} |"
        yield f"| relay RSS after traffic on all | {rss['after_traffic_kib'] / 1024:.1f} MiB " \
              f"(peak {rss['hwm_kib'] / 1024:.1f}) | <= 100 MB | " \
              f"{verdict(rss['hwm_kib'] * 1024 <= 100e6)} |"
        answering = (scale.get("answered_conns") == scale["conns"] and not scale["errors"]
                     and scale["exchanges"] > 0)
        yield f"| still answering: exchanges/s over all | {scale['rate']:,.0f} " \
              f"(p50 {scale['p50_us']:,.0f} us, p99 {scale['p99_us']:,.0f} us) | answers | |"
        yield f"| connections answered in the window, errors | " \
              f"{scale.get('answered_conns', 0):,} of {scale['conns']:,} (fewest replies on " \
              f"one: {scale.get('min_replies_per_conn', 0):,}); errors: " \
              f"{errors_of([scale])} | all, none | {verdict(answering)} |"
        yield ""
    if guest:
        g = guest
        yield "### Guest daemon footprint, 16 s poll (software clock, through the relay)"
        yield ""
        yield "| figure | value | baseline / target | verdict |"
        yield "|---|---:|---|---|"
        yield (f"| RSS (VmRSS) | {g['rss_kib'] / 1024:.1f} MiB (peak {g['hwm_kib'] / 1024:.1f}) | "
               f"idle python {g['idle_python_rss_kib'] / 1024:.1f} MiB "
               f"({ratio(g['rss_kib'], g['idle_python_rss_kib'])}); <= 40 MB | "
               f"{verdict(g['hwm_kib'] * 1024 <= 40e6)} |")
        yield (f"| CPU, steady state | {g['cpu_percent']:.3f} % "
               f"({g['cpu_window_s'] * 1000:.1f} ms CPU in {g['window_s']:.0f} s) | <= 0.1 % | "
               f"{verdict(g['cpu_percent'] <= 0.1)} |")
        yield (f"| CPU incl. start-up | {g['cpu_total_percent']:.3f} % "
               f"({g['cpu_total_s']:.2f} s CPU; utime+stime {g['cpu_ticks_total_s']:.2f} s) | | |")
        yield f"| guest state at end | {g['state']}, {g.get('samples', '?')} samples | | |"
        yield ""


def main() -> int:
    ap = argparse.ArgumentParser(description="relay and guest benchmarks (see module doc)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window per case")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured lead-in per case")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of interleaved cases")
    ap.add_argument("--churn-conns", type=int, default=8)
    ap.add_argument("--scale-conns", type=int, default=1000)
    ap.add_argument("--guest-warmup", type=float, default=20.0,
                    help="seconds before the guest CPU window (start-up and initial burst)")
    ap.add_argument("--guest-seconds", type=float, default=64.0,
                    help="guest CPU window (4 polls at 16 s)")
    ap.add_argument("--skip-forwarding", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-guest", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write raw results here")
    args = ap.parse_args()
    if shutil.which("socat") is None and not args.skip_forwarding:
        ap.error("socat is not installed (or use --skip-forwarding)")
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="timesync-bench-"))
    fwd = scale = guest = None
    try:
        responder, port = start_responder(procs, lifetime_s=600)
        if not args.skip_forwarding:
            fwd = bench_forwarding(args, procs, tmp, port, responder.pid)
        if not args.skip_scale:
            scale = bench_scale(args, procs, tmp, port, responder.pid)
        if not args.skip_guest:
            guest = bench_guest(args, procs, tmp, port)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"forwarding": fwd, "scale": scale, "guest": guest}, indent=1))
    print("\n".join(report(args, fwd, scale, guest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
