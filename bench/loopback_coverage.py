"""Loopback bound coverage (issue 9): does the guest's ``error_bound_s`` contain its true
offset through relay restarts, an upstream outage and a refused upstream jump?

    python bench/loopback_coverage.py                    # all three, both loops (~7 minutes)
    python bench/loopback_coverage.py --outage-s 300 --faults outage --loop uvloop

Each fault runs on loopback under asyncio and uvloop: guest (in process, ``SoftwareClock``
``--native-ppm`` fast, 50 ms off at start) -> relay (in process, Unix socket) -> upstream.
The guest's status is sampled every ``--every-s`` from its start to the end of the run:
coverage is the share of samples with |true offset| <= ``error_bound_s``, true against the
reference the guest is configured to trust.

* ``relay``: real ``chronyd -x``; the relay is stopped and restarted ``--restarts`` times,
  ``--down-s`` down and ``--up-s`` up each time.
* ``outage``: real ``chronyd -x`` stopped for ``--outage-s``, then started again on the same
  port (the fixture checks the process it started owns the port and answers).
* ``jump``: the tests' fake NTP server (chronyd cannot jump); it jumps +2 s, the guest must
  refuse, the relay then restarts (a reconnect must not explain the jump), then the upstream
  goes back. Truth is the upstream's time, so the refused 2 s must show in the bound. An NTP
  server's time is what its replies say: the truth moves with the first reply carrying the
  jump. The column "truth moved at the change" counts from the moment the knob moves instead:
  the samples before the guest's next poll can then never be covered, by any guest.

Prints one table row per fault and loop; exit status 1 when any coverage is below
``--target`` (0.99). Bounded: every wait has a deadline; chronyd, relay and guest are stopped
at the end of each run; temporary directories only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout first, then the tests' fixtures

from chrony_fixture import chronyd  # noqa: E402
from guest_fakes import start_ntp_server  # noqa: E402
from guest_rig import Coverage, Sampler, start_relay, wait_synchronised  # noqa: E402
from loops import LOOPS, run  # noqa: E402

from guest_client.clocks import SoftwareClock  # noqa: E402
from guest_client.daemon import GuestDaemon  # noqa: E402
from guest_client.settings import GuestSettings  # noqa: E402
from host_relay.service import RelayService  # noqa: E402

_NS = 1_000_000_000


@dataclass
class Result:
    fault: str
    loop: str
    cov: Coverage
    note: str


class Rig:
    """One guest on a software clock through a relay on a Unix socket, and its sampler."""

    def __init__(self, args: argparse.Namespace, tmp: str, upstream: str,
                 reference_ns: Callable[[], int] = lambda: 0,
                 raw_reference_ns: Callable[[], int] | None = None) -> None:
        self.args, self.upstream = args, upstream
        self.sock = os.path.join(tmp, "relay.sock")
        self.clock = SoftwareClock(args.native_ppm, 0.05)
        self.daemon = GuestDaemon(
            GuestSettings(relay=f"unix:{self.sock}", clock="software", status_socket="",
                          health_interval_s=0, minpoll=args.minpoll, maxpoll=args.maxpoll),
            self.clock, rng=random.Random(1))
        self.sampler = Sampler(self.daemon, self.clock, args.every_s,
                               max_s=args.max_run_s, reference_ns=reference_ns,
                               raw_reference_ns=raw_reference_ns)
        self.relay: RelayService | None = None

    async def __aenter__(self) -> Rig:
        self.relay = await start_relay(self.upstream, self.sock)
        self.sampler.start()
        await self.daemon.start()
        if not await wait_synchronised(self.daemon, self.clock, 90.0):
            raise RuntimeError("the guest did not synchronise within 90 s")
        await self.hold("steady", self.args.steady_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cov = await self.sampler.stop()
        await self.daemon.stop()
        await self.relay_down()

    async def hold(self, phase: str, seconds: float) -> None:
        self.sampler.phase = phase
        await asyncio.sleep(seconds)

    async def relay_down(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None

    async def relay_up(self) -> None:
        self.relay = await start_relay(self.upstream, self.sock)

    async def until(self, phase: str, cond: Callable[[dict[str, object]], bool],
                    timeout_s: float) -> float | None:
        """Seconds until ``cond(status)`` holds (None: not within ``timeout_s``)."""
        self.sampler.phase = phase
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if cond(self.daemon.status()):
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        return None


async def relay_restarts(args: argparse.Namespace, tmp: str) -> tuple[Coverage, str]:
    with chronyd() as server:
        async with Rig(args, tmp, server.address) as rig:
            states = set()
            for i in range(args.restarts):
                await rig.relay_down()
                await rig.hold(f"relay down {i + 1}", args.down_s)
                states.add(rig.daemon.status()["state"])
                await rig.relay_up()
                await rig.hold(f"relay back {i + 1}", args.up_s)
        return rig.cov, f"{args.restarts} x {args.down_s:g} s down; state at end of each: " + (
            ", ".join(sorted(states)))


async def upstream_outage(args: argparse.Namespace, tmp: str) -> tuple[Coverage, str]:
    with contextlib.ExitStack() as stack:
        first = contextlib.ExitStack()
        server = first.enter_context(chronyd())
        stack.push(first)
        async with Rig(args, tmp, server.address) as rig:
            await asyncio.to_thread(first.close)  # chronyd stops (blocking wait, off the loop)
            await rig.hold("outage", args.outage_s)
            st = rig.daemon.status()
            end = f"at the end: {st['state']}, bound {st['error_bound_s'] * 1e3:.2f} ms"
            again = await asyncio.to_thread(stack.enter_context, chronyd(port=server.port))
            if again.port != server.port or again.pid == server.pid:
                raise RuntimeError("the restarted chronyd is not the one answering")
            back = await rig.until(
                "upstream back", lambda s: bool(
                s["state"] == "synchronised" and s["bound_verified"]), args.recover_s)
            await rig.hold("recovered", args.after_s)
        note = (f"{args.outage_s:g} s outage ({end}); synchronised again "
                + ("never" if back is None else f"after {back:.1f} s"))
        return rig.cov, note


async def upstream_jump(args: argparse.Namespace, tmp: str) -> tuple[Coverage, str]:
    shift = {"set": 0, "served": 0}  # the upstream's time minus the machine's: set, answered

    def serve() -> int:
        shift["served"] = shift["set"]
        return shift["set"]

    ntp = await start_ntp_server(serve)
    try:
        async with Rig(args, tmp, ntp.address, reference_ns=lambda: shift["served"],
                       raw_reference_ns=lambda: shift["set"]) as rig:
            shift["set"] = 2 * _NS
            first = await rig.until("jumped +2 s", lambda s: bool(s["refused_jumps"]), 30.0)
            seen = await rig.until("jumped +2 s", lambda s: s["disagreement_s"] != 0.0, 30.0)
            await rig.hold("jumped +2 s", args.up_s)
            await rig.relay_down()
            await rig.hold("relay down", args.down_s)
            await rig.relay_up()
            await rig.hold("reconnected", args.up_s)
            steps_held = rig.daemon.status()["steps"]
            shift["set"] = 0
            back = await rig.until("upstream back", lambda s: s["state"] == "synchronised",
                                   args.recover_s)
            await rig.hold("upstream back", args.after_s)
        note = ("first refusal " + ("never" if first is None else f"after {first:.1f} s")
                + ", confirmed (sources_disagree) " + ("never" if seen is None
                                                         else f"{seen:.1f} s later")
                + f"; steps while lying {steps_held}; synchronised after the way back "
                + ("never" if back is None else f"{back:.1f} s"))
        return rig.cov, note
    finally:
        ntp.close()


FAULTS: dict[str, Callable[[argparse.Namespace, str], Awaitable[tuple[Coverage, str]]]] = {
    "relay": relay_restarts, "outage": upstream_outage, "jump": upstream_jump}


def one(fault: str, loop: str, args: argparse.Namespace) -> Result:
    out: list[tuple[Coverage, str]] = []

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="ts-loopcov-") as tmp:
            out.append(await asyncio.wait_for(FAULTS[fault](args, tmp), args.max_run_s + 60))

    run(main, loop)
    return Result(fault, loop, *out[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    ap.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--down-s", type=float, default=4.0)
    ap.add_argument("--up-s", type=float, default=10.0)
    ap.add_argument("--steady-s", type=float, default=10.0)
    ap.add_argument("--after-s", type=float, default=10.0)
    ap.add_argument("--recover-s", type=float, default=30.0)
    ap.add_argument("--native-ppm", type=float, default=150.0)
    ap.add_argument("--minpoll", type=int, default=0)
    ap.add_argument("--maxpoll", type=int, default=2)
    ap.add_argument("--every-s", type=float, default=0.2)
    ap.add_argument("--max-run-s", type=float, default=600.0)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--show-outside", type=int, default=5,
                    help="print this many samples outside the bound per run")
    ap.add_argument("--log-level", default="ERROR", help="the guest's and relay's logging")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.outage_s > 300:
        ap.error("--outage-s: at most 300 (the run is bounded)")
    loops = LOOPS if args.loop == "both" else [args.loop]
    results = []
    t0 = time.monotonic()
    for fault in args.faults:
        for loop in loops:
            r = one(fault, loop, args)
            results.append(r)
            c = r.cov
            print(f"# {fault} {loop}: {c.samples} samples, coverage {c.coverage:.4f}; {r.note}",
                  flush=True)
            for s in c.outside[:args.show_outside]:
                print(f"#   outside: t={s.t:.1f} s {s.phase} {s.state} |true| "
                      f"{s.true_s * 1e3:.3f} ms > bound {s.bound_s * 1e3:.3f} ms", flush=True)
    print(f"\n({time.monotonic() - t0:.0f} s)\n")
    print("| fault | loop | samples | coverage | worst true/bound | outside (all) | "
          "synchronised samples | outside (synchronised) | target | truth moved at the change "
          "| notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    failed = False
    for r in results:
        c = r.cov
        ok = c.coverage >= args.target
        failed |= not ok
        print(f"| {r.fault} | {r.loop} | {c.samples} | {c.coverage:.4f} | {c.worst_ratio:.3f} | "
              f"{len(c.outside)} | {c.synced} | {c.synced_outside} | "
              f">= {args.target:g}: {'met' if ok else 'MISSED'} | {c.raw_coverage:.4f} | "
              f"{r.note} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
