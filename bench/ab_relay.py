"""A/B of two relay trees on the same machine moment: forwarding (1 and 100 guests) and
connection churn, rounds interleaved (ABBA), relay CPU per exchange from /proc, which moves
less with the machine's load than latency does.

    git archive OLD_COMMIT | tar -x -C /tmp/old
    python bench/ab_relay.py --old /tmp/old --new . --rounds 6
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_all as ra  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="tree of the baseline relay")
    ap.add_argument("--new", default=".", help="tree of the relay under test")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cases", default="1,100,churn",
                    help="comma list of: 1, 100 (guests forwarding), churn (8 clients)")
    args = ap.parse_args()
    known = {"1": ("relay", 1), "100": ("relay", 100), "churn": ("churn-relay", 8)}
    cases = [known[c] for c in args.cases.split(",")]
    procs = ra.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="ab-"))
    try:
        _, port = ra.start_responder(procs, 900)
        relays = {}
        for name, root in (("old", args.old), ("new", args.new)):
            root = str(Path(root).resolve())
            path = tmp / f"{name}.sock"
            # cwd too: `python -c` puts the working directory first on sys.path
            p = subprocess.Popen(ra.relay_argv(path, port),
                                 env=dict(os.environ, PYTHONPATH=root), cwd=root)
            procs.procs.append(p)
            ra.wait_unix(path, p)
            relays[name] = (p, path)
        res: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
        for rnd in range(min(args.rounds, 20)):
            for name in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                p, path = relays[name]
                for mode, conns in cases:
                    r = ra.loadgen(mode, conns, 2.0, 0.5, path=path,
                                   watch={"forwarder": p.pid})
                    cpu = r["cpu"]["forwarder"] * r["window_s"] / r["exchanges"] * 1e6
                    res.setdefault((name, mode, conns), []).append(
                        (cpu, r["p50_us"], r["rate"]))
        print("| case | tree | relay CPU us/exchange | p50 us | exchanges/s |")
        print("|---|---|---:|---:|---:|")
        for (name, mode, conns), v in sorted(res.items(), key=lambda kv: (kv[0][1:], kv[0][0])):
            print(f"| {mode}/{conns} | {name} | {statistics.median(x[0] for x in v):.1f} | "
                  f"{statistics.median(x[1] for x in v):,.0f} | "
                  f"{statistics.median(x[2] for x in v):,.0f} |")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
