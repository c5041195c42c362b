"""How wrong can the tests' truth be? ``SoftwareClock.true_offset_ns`` against the back-to-back
read it replaced, interleaved in one run, on a clock whose true offset is a constant.

    python bench/truth_read.py --seconds 10 --busy 3

Any spread of the readings is the read itself: a preemption between the monotonic and the
realtime read. Prints, for each way, the reads, how many were off by more than 20 us, and the
largest error; a run with 0 busy loops is the idle baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))
from relay_accuracy import busy_loops  # noqa: E402

from guest_client.clocks import SoftwareClock  # noqa: E402

_OFF_NS = 20_000


@dataclass
class Tally:
    reads: int = 0
    off: int = 0
    worst_ns: int = 0

    def add(self, error_ns: int) -> None:
        self.reads += 1
        if abs(error_ns) > _OFF_NS:
            self.off += 1
        self.worst_ns = max(self.worst_ns, abs(error_ns))


def measure(seconds: float) -> dict[str, Tally]:
    clock = SoftwareClock(0.0, 0.0)
    ways: dict[str, Callable[[], int]] = {
        "back to back": lambda: clock.now_ns() - time.time_ns(),
        "bracketed": clock.true_offset_ns,
    }
    base = {name: statistics.median(read() for _ in range(1001)) for name, read in ways.items()}
    tallies = {name: Tally() for name in ways}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, read in ways.items():
            tallies[name].add(read() - int(base[name]))
    return tallies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--busy", type=int, default=3, help="busy loops beside the reader")
    args = ap.parse_args()
    for busy in (0, args.busy):
        with busy_loops(busy, args.seconds + 5):
            tallies = measure(args.seconds)
        for name, t in tallies.items():
            print(f"busy {busy}  {name:13s} reads {t.reads:>10,}  off >20 us {t.off:>6}"
                  f" ({t.off / max(t.reads, 1):.1e})  worst {t.worst_ns / 1000:9.1f} us")


if __name__ == "__main__":
    main()
