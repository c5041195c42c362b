"""Benchmark: 30 simulated days of ``discipline`` at a fixed 16 s poll, with token checks.

Run: ``python bench/bench_sim.py [--days 30] [--profile]``. Target: under 30 s on one core.
Prints wall time, packets, and with ``--profile`` the cProfile top entries (cumulative).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.runner import run_scenario  # noqa: E402
from sim.scenario import Scenario  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    sc = Scenario(days=args.days, strategies=("discipline",), minpoll=4, maxpoll=4)
    prof = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if prof:
        prof.enable()
    res = run_scenario(sc)["discipline"]
    if prof:
        prof.disable()
    wall = time.perf_counter() - started
    tokens = sum(t.issued for t in res.tokens.values())
    print(f"{args.days:g} days discipline @16 s poll: {wall:.2f} s wall, "
          f"{res.extra['packets_sent']} packets, {tokens} tokens (+replays), "
          f"max |offset| {res.max_abs_offset_s * 1e6:.1f} us, "
          f"rejected {sum(t.rejected for t in res.tokens.values())}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
