"""Benchmark: the guest's restart transient (issue 9, items 3 and 4), real chronyd -> relay ->
guest on a ``SoftwareClock`` that outlives each daemon as a kernel clock does.

Run: ``python bench/bench_restart.py [--native-ppm 150] [--steady-s 30] [--after-s 30]``.

For each scenario, one daemon converges and runs ``--steady-s`` (its max |true offset| over that
span is the steady state), then stops (cleanly, or "killed": the clock keeps what it held and no
file is written at stop) and a second daemon starts on the same clock and runs ``--after-s``.
The figure is max |true offset| after the restart, as a ratio to the first daemon's steady
state in the same scenario; target for a clean stop with a frequency file: <= 2x steady +
100 us. The baseline scenario, measured in the same invocation, is the code before this work:
no restore at stop, and a controller that assumes the clock holds no correction.

It also counts, after the restart, the synchronised status samples whose ``root_distance_s``
does not contain the true offset (the bound of today; see issue 9 item 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chrony_fixture import chronyd  # noqa: E402
from guest_rig import start_relay, wait_synchronised  # noqa: E402

from guest_client.clocks import SoftwareClock  # noqa: E402
from guest_client.controller import GuestController  # noqa: E402
from guest_client.daemon import GuestDaemon  # noqa: E402
from guest_client.settings import GuestSettings  # noqa: E402

_NS = 1_000_000_000


@dataclass
class Scenario:
    name: str
    freq_file: bool
    killed: bool
    legacy: bool = False  # the code before: no restore, controller assumes zero


SCENARIOS = [
    Scenario("baseline: before (no restore, model assumes 0)", False, False, legacy=True),
    Scenario("clean stop, frequency file", True, False),
    Scenario("clean stop, no file", False, False),
    Scenario("killed, frequency file (periodic)", True, True),
    Scenario("killed, no file", False, True),
]


async def watch(daemon: GuestDaemon, clock: SoftwareClock, seconds: float,
                ) -> tuple[float, int, int]:
    """(max |true offset|, synchronised samples, those outside root_distance_s)."""
    worst, synced, missed = 0.0, 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        true = abs(clock.true_offset_ns()) / _NS
        st = daemon.status()
        worst = max(worst, true)
        if st["state"] == "synchronised":
            synced += 1
            missed += true > st["root_distance_s"]
        await asyncio.sleep(0.05)
    return worst, synced, missed


def make_daemon(settings: GuestSettings, clock: SoftwareClock, seed: int,
                legacy: bool) -> GuestDaemon:
    if not legacy:
        return GuestDaemon(settings, clock, rng=random.Random(seed))
    ctrl = GuestController(settings.discipline_config(), random.Random(seed))
    return GuestDaemon(settings, clock, rng=random.Random(seed), controller=ctrl)


async def run_one(sc: Scenario, relay_addr: str, tmp: str, args: argparse.Namespace
                  ) -> dict[str, Any]:
    clock = SoftwareClock(args.native_ppm, 0.05)
    settings = GuestSettings(
        relay=relay_addr, clock="software", status_socket="", health_interval_s=0,
        minpoll=args.minpoll, maxpoll=args.maxpoll,
        freq_file=os.path.join(tmp, sc.name.split(":")[0].replace(" ", "_") + ".freq")
        if sc.freq_file else None, freq_file_interval_s=5.0)
    first = make_daemon(settings, clock, 1, sc.legacy)
    await first.start()
    await wait_synchronised(first, clock, 90.0)
    await asyncio.sleep(args.settle_s)
    steady, _, _ = await watch(first, clock, args.steady_s)
    if sc.killed or sc.legacy:
        first._clock_touched = False  # SIGKILL, or the code before: the clock keeps its slew
    await first.stop()
    held = clock.correction_ppm
    second = make_daemon(settings, clock, 2, sc.legacy)
    await second.start()
    after, synced, missed = await watch(second, clock, args.after_s)
    await second.stop()
    sf = second.start_frequency
    return {"scenario": sc.name, "steady_max_us": steady * 1e6, "after_max_us": after * 1e6,
            "ratio": after / steady if steady else float("inf"),
            "target_us": (2 * steady + 100e-6) * 1e6,
            "held_at_restart_ppm": held,
            "start": "model assumes 0" if sf is None else f"{sf.ppm:+.2f} ppm ({sf.reason})",
            "synced_samples": synced, "outside_root_distance": missed}


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with chronyd() as server, tempfile.TemporaryDirectory(prefix="ts-bench-restart-") as tmp:
        sock = os.path.join(tmp, "relay.sock")
        relay = await start_relay(server.address, sock)
        try:
            for sc in SCENARIOS:
                if args.only and args.only not in sc.name:
                    continue
                r = await run_one(sc, f"unix:{sock}", tmp, args)
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            await relay.stop()
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--native-ppm", type=float, default=150.0)
    p.add_argument("--minpoll", type=int, default=0)
    p.add_argument("--maxpoll", type=int, default=2)
    p.add_argument("--settle-s", type=float, default=20.0)
    p.add_argument("--steady-s", type=float, default=30.0)
    p.add_argument("--after-s", type=float, default=30.0)
    p.add_argument("--only", default="", help="run the scenarios whose name contains this")
    rows = asyncio.run(main(p.parse_args()))
    print("\n| scenario | start | steady max | after restart | ratio | target | outside bound |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['start']} | {r['steady_max_us']:.0f} us | "
              f"{r['after_max_us']:.0f} us | {r['ratio']:.2f}x | {r['target_us']:.0f} us | "
              f"{r['outside_root_distance']}/{r['synced_samples']} |")
