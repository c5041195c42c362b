"""``timesync demo``: relay and guest in one process on a Unix socket, a drifting software
clock brought into line live. The embedded default that shows the product working."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.cli.options import Float
from timesyncd.cli.runtime import run_until_signal


@dataclasses.dataclass
class DemoSummary:
    duration_s: float
    final_true_offset_s: float
    converged_after_s: float | None  # |true offset| < 1 ms from then on
    max_abs_true_offset_after_convergence_s: float | None
    steps: int
    refused_jumps: int
    frequency_ppm: float


def _line(elapsed: float, st: dict[str, Any], true_offset: float) -> str:
    est = st.get("offset_s")
    est_text = "-" if est is None else f"{est * 1e3:+9.3f} ms"
    return (f"{elapsed:6.1f} s  {st['state']:<14}  estimated {est_text}  "
            f"true {true_offset * 1e3:+9.3f} ms  freq {st['frequency_ppm']:+8.2f} ppm  "
            f"poll {st['poll_s']:g} s")


async def run_demo(duration: float, freq_ppm: float, offset_s: float,
                   stop: asyncio.Event | None = None, echo: Any = click.echo) -> DemoSummary:
    with tempfile.TemporaryDirectory(prefix="timesync-demo-") as tmp:
        sock = Path(tmp) / "relay.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        clock = SoftwareClock(freq_ppm=freq_ppm, offset_s=offset_s)
        settings = GuestSettings(relay=f"unix:{sock}", clock="software",
                                 software_freq_ppm=freq_ppm, software_offset_s=offset_s,
                                 status_socket=str(Path(tmp) / "guest.sock"),
                                 minpoll=0, maxpoll=2)
        guest = GuestDaemon(settings, clock)
        await guest.start()
        echo(f"relay on unix:{sock} answering from the host clock; software clock starts "
             f"{offset_s:+.3f} s off, running {freq_ppm:+.1f} ppm fast")
        start = time.monotonic()
        history: list[tuple[float, float]] = []
        try:
            while (elapsed := time.monotonic() - start) < duration:
                if stop is not None and stop.is_set():
                    break
                st = guest.status()
                true_offset = (clock.true_offset_ns() or 0) / 1e9
                history.append((elapsed, true_offset))
                echo(_line(elapsed, st, true_offset))
                await asyncio.sleep(1.0)
            st = guest.status()
        finally:
            await guest.stop()
            await relay.stop()
        final = (clock.true_offset_ns() or 0) / 1e9
        history.append((time.monotonic() - start, final))
        converged = None
        for i, (t, _) in enumerate(history):
            if all(abs(o) < 1e-3 for _, o in history[i:]):
                converged = t
                break
        after = [abs(o) for t, o in history if converged is not None and t >= converged]
        return DemoSummary(
            duration_s=history[-1][0], final_true_offset_s=final, converged_after_s=converged,
            max_abs_true_offset_after_convergence_s=max(after) if after else None,
            steps=st["steps"], refused_jumps=st["refused_jumps"],
            frequency_ppm=st["frequency_ppm"],
        )


@click.command()
@click.option("--duration", type=Float(0, 86400.0, min_open=True), default=60.0,
              show_default="60 s", help="Seconds to run.")
@click.option("--freq-ppm", type=Float(-50_000.0, 50_000.0), default=200.0,
              show_default="200 ppm", help="Software clock's rate error (positive: runs fast).")
@click.option("--offset", type=Float(-1e6, 1e6), default=0.5, show_default="0.5 s",
              help="Software clock's initial offset, seconds (positive: ahead).")
@click.pass_context
def demo(ctx: click.Context, duration: float, freq_ppm: float, offset: float) -> None:
    """Relay + guest on a Unix socket: watch a drifting software clock converge."""
    loop = (ctx.obj or {}).get("loop", "auto")
    if logging.getLogger().level > logging.DEBUG:  # keep service chatter out of the live table
        for name in ("host_relay", "guest_client"):
            logging.getLogger(name).setLevel(logging.WARNING)
    summary = run_until_signal(lambda stop: run_demo(duration, freq_ppm, offset, stop), loop)
    conv = summary.converged_after_s
    click.echo("")
    click.echo("summary")
    click.echo(f"  ran                 {summary.duration_s:.1f} s")
    click.echo(f"  final true offset   {summary.final_true_offset_s * 1e6:+.1f} us")
    click.echo("  under 1 ms after    " + ("never" if conv is None else f"{conv:.1f} s"))
    if summary.max_abs_true_offset_after_convergence_s is not None:
        click.echo(f"  max |offset| since  "
                   f"{summary.max_abs_true_offset_after_convergence_s * 1e6:.1f} us")
    click.echo(f"  frequency estimate  {summary.frequency_ppm:+.2f} ppm (true {freq_ppm:+.2f})")
    click.echo(f"  steps {summary.steps}, refused jumps {summary.refused_jumps}")
    if conv is None:
        raise SystemExit(1)
