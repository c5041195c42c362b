"""Calls per second of the application API (``timesyncd.clockbound``) against ``time.time()``.

Writes a segment in a temporary folder (the daemon's writer, status SYNCHRONIZED), then times
``BoundedClock.now()``, ``BoundedClock.now_ns()``, ``time.time()`` and a floor (a method
that only reads the two clocks every such call needs) in interleaved rounds
and reports each case's best round (the machine is shared: the best round is the one least
disturbed) and its ratio to ``time.time()`` from the same invocation. The goal is a ratio of
at least 1/5 (0.20).

    python bench/bench_clockbound.py                 # 7 rounds of 0.3 s per case
    python bench/bench_clockbound.py --rounds 3 --seconds 0.2 --json /tmp/cb.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest_client.clockbound_writer import ClockBoundWriter, PublishedBound  # noqa: E402
from timesyncd.clockbound import (  # noqa: E402
    CLOCK_MONOTONIC_COARSE,
    BoundedClock,
    ClockStatus,
)


class _Floor:
    """The least any such call can cost: a method reading both clocks, returning a tuple."""

    def __init__(self) -> None:
        self._realtime_ns = time.time_ns

    def now_ns(self) -> tuple[int, int, int]:
        real = self._realtime_ns()
        mono = time.monotonic_ns()
        return real, mono, 0


def rate(fn: object, seconds: float) -> float:
    """Calls per second of ``fn`` in a tight loop of ``seconds`` (1000 calls per check)."""
    call = fn
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(100):
            call(); call(); call(); call(); call(); call(); call(); call(); call(); call()  # type: ignore[operator]  # noqa: E702,E501
        n += 1000
        now = time.perf_counter()
        if now >= end:
            return n / (now - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ts-bench-cb-") as tmp:
        path = str(Path(tmp) / "shm0")
        writer = ClockBoundWriter(path, void_after_s=3600.0)
        writer.write(PublishedBound(time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE), 1_000_000,
                                    15_000, ClockStatus.SYNCHRONIZED))
        clock = BoundedClock(path)
        cases = {"time.time()": time.time, "BoundedClock.now()": clock.now,
                 "BoundedClock.now_ns()": clock.now_ns,
                 "floor: method reading both clocks": _Floor().now_ns}
        best = dict.fromkeys(cases, 0.0)
        for _ in range(args.rounds):
            for name, fn in cases.items():
                best[name] = max(best[name], rate(fn, args.seconds))
        clock.close()
        writer.close()
    base = best["time.time()"]
    print(f"| call | calls/s (best of {args.rounds}) | ratio to time.time() |")
    print("|---|---|---|")
    for name, r in best.items():
        print(f"| `{name}` | {r:,.0f} | {r / base:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "calls_per_s": best}))


if __name__ == "__main__":
    main()
