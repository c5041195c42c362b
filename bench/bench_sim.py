"""Benchmark: 30 simulated days of ``discipline`` at a fixed 16 s poll, with token checks.

Run: ``python bench/bench_sim.py [--days 30] [--profile]``. Target: well under 30 s on one core.

Prints the wall time and, measured in the same invocation so that a busy or slow machine
cancels out, the wall time of a bare discrete-event loop (``heapq`` push/pop and a float add)
over the same number of events: the ratio is what one simulated event costs beyond the loop
itself (the controller's work, packet encode/decode, the network and clock models). With
``--profile`` it adds the cProfile top entries and the share of time spent inside
``GuestController`` (the code under test, not the simulator's overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sim.strategies  # noqa: E402
from sim.engine import Engine  # noqa: E402
from sim.runner import run_scenario  # noqa: E402
from sim.scenario import Scenario  # noqa: E402
from sim.strategies import SimInputs  # noqa: E402

CONTROLLER_ENTRY_POINTS = ("on_reply", "on_timer", "next_timer_ns", "add_source", "start",
                           "status", "on_connection_lost")


def bare_event_loop(n: int) -> float:
    """Wall seconds of a heap event loop doing nothing per event, ``n`` events."""
    rng = random.Random(1)
    heap: list[tuple[float, int]] = [(0.0, 0)]
    acc = 0.0
    started = time.perf_counter()
    for i in range(n):
        t, _ = heapq.heappop(heap)
        acc += t
        heapq.heappush(heap, (t + rng.random(), i))
    return time.perf_counter() - started


def controller_share(stats: pstats.Stats) -> float:
    """Fraction of profiled time inside GuestController's public entry points."""
    total = stats.total_tt  # type: ignore[attr-defined]
    inside = 0.0
    for (path, _, name), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if path.endswith("guest_client/controller.py") and name in CONTROLLER_ENTRY_POINTS:
            inside += cum
    return inside / total if total else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    sc = Scenario(days=args.days, strategies=("discipline",), minpoll=4, maxpoll=4)
    engines: list[Engine] = []
    build = sim.strategies.build_engine

    def keep(inputs: SimInputs) -> Engine:  # to count the run's events afterwards
        engines.append(build(inputs))
        return engines[-1]

    sim.strategies.build_engine = keep
    prof = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if prof:
        prof.enable()
    res = run_scenario(sc)["discipline"]
    if prof:
        prof.disable()
    wall = time.perf_counter() - started
    events = engines[0].events
    base = bare_event_loop(events)
    tokens = sum(t.issued for t in res.tokens.values())
    print(f"{args.days:g} days discipline @16 s poll: {wall:.2f} s wall, "
          f"{res.extra['packets_sent']} packets, {events} events, {tokens} tokens (+replays), "
          f"max |offset| {res.max_abs_offset_s * 1e6:.1f} us, "
          f"rejected {sum(t.rejected for t in res.tokens.values())}")
    print(f"bare event loop, same {events} events: {base:.3f} s; ratio {wall / base:.1f}x "
          f"({wall / events * 1e6:.1f} us per event vs {base / events * 1e6:.2f} us)")
    if prof:
        stats = pstats.Stats(prof)
        print(f"inside GuestController: {controller_share(stats):.0%} of profiled time")
        stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
