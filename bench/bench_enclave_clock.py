"""Benchmark: the enclave_clock fixture's first week, against drift-sim's week in the same run.

Run: ``python bench/bench_enclave_clock.py [--repeats 3]``. Each case runs in a fresh Python
process (cold imports, empty caches) and reports its wall time (from before importing the
simulator to the end) and max RSS; cases are interleaved per repeat and the table shows
medians, with ratios against the baseline measured in the same invocation:

* ``baseline``: what a week of ``discipline`` cost before the plugin, drift-sim's run for one
  strategy (``run_scenario``, 7 days, default options, token checks included);
* ``fixture-<strategy>``: ``EnclaveClock`` on a fresh timeline, swept over the week every
  10 minutes reading ``time.time()`` and ``datetime.now()`` (what the shipped examples do);
* ``fixture-cached``: the same week again in that process (the session cache; the wall time
  of ``fixture-discipline`` stops before it);
* ``fixture-disk``: a new process loading the week saved by an earlier one (disk cache).

Goal (issue 17): the first week at default settings under 2 s here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
case, cache_dir = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
extra = {{}}
if case == "baseline":
    from sim.runner import run_scenario
    from sim.scenario import Scenario
    run_scenario(Scenario(strategies=("discipline",)))
else:
    import datetime as dt
    from pathlib import Path
    from sim.enclave_clock import EnclaveClock
    from sim.pytest_plugin import TimelineCache
    from sim.timeline import scenario_from_options
    strategy = case.split("-")[1] if case.split("-")[1] in ("none", "step") else "discipline"
    cache = TimelineCache(Path(cache_dir) if case == "fixture-disk" else None)

    def week():
        sc, s = scenario_from_options(strategy=strategy)
        clock = EnclaveClock(cache.get(sc, s)).start_freezing()
        try:
            for _ in clock.sweep("10m"):
                time.time(); dt.datetime.now(dt.timezone.utc)
        finally:
            clock.stop()
    week()
    extra["built"] = cache.built
    if case == "fixture-discipline":
        extra["first_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        week()
        extra["cached_s"] = time.perf_counter() - t1
wall = extra.pop("first_s", None) or time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"wall_s": wall, "rss_mb": rss, **extra}}))
"""


def run_case(case: str, cache_dir: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), case, cache_dir],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = ["baseline", "fixture-discipline", "fixture-none", "fixture-step", "fixture-disk"]
    results: dict[str, list[dict[str, float]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as cache_dir:
        # fill the disk cache once (a first session with --enclave-clock-cache)
        from_disk_fill = subprocess.run(
            [sys.executable, "-c", CHILD.format(root=str(ROOT)), "fixture-disk", cache_dir],
            capture_output=True, text=True, timeout=600, check=True)
        fill = json.loads(from_disk_fill.stdout.strip().splitlines()[-1])
        print(f"disk cache filled by a first session: {fill['wall_s']:.2f} s "
              f"(built {fill['built']:g})")
        for _ in range(args.repeats):
            for case in cases:
                results[case].append(run_case(case, cache_dir))
    base = statistics.median(r["wall_s"] for r in results["baseline"])
    print(f"\nmedians of {args.repeats} repeats, each case a fresh process "
          f"(wall from importing the simulator)")
    print(f"{'case':<22}{'wall s':>9}{'ratio':>8}{'max RSS MB':>12}")
    for case in cases:
        wall = statistics.median(r["wall_s"] for r in results[case])
        rss = statistics.median(r["rss_mb"] for r in results[case])
        print(f"{case:<22}{wall:>9.2f}{wall / base:>7.2f}x{rss:>12.1f}")
    cached = statistics.median(r["cached_s"] for r in results["fixture-discipline"])
    print(f"{'fixture-cached':<22}{cached:>9.3f}{cached / base:>7.3f}x{'(same process)':>12}")
    built = {r["built"] for r in results["fixture-disk"]}
    print(f"disk-cache sessions simulated {sorted(built)} timelines (0: loaded)")


if __name__ == "__main__":
    main()
