"""``timesync now``: read the ClockBound segment the guest publishes (``--clockbound-shm``)."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import click

from timesyncd.clockbound import CLOCK_MONOTONIC_COARSE, DEFAULT_PATH, BoundedClock, SegmentError


def read_now(path: str) -> dict[str, Any]:
    """The ``timesync now --json`` object: the interval now and the snapshot behind it."""
    with BoundedClock(path) as clock:
        snap = clock.snapshot()
        t = clock.now()
        mono = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    return {
        "path": path, "status": t.status.name.lower(),
        "earliest_ns": t.earliest_ns, "latest_ns": t.latest_ns, "bound_s": t.bound_ns / 1e9,
        "published_bound_s": snap.bound_ns / 1e9, "max_drift_ppb": snap.max_drift_ppb,
        "segment_age_s": (mono - snap.as_of_ns) / 1e9 if snap.generation else None,
        "void_in_s": (snap.void_after_ns - mono) / 1e9 if snap.generation else None,
        "generation": snap.generation,
    }


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


@click.command("now")
@click.option("--path", default=DEFAULT_PATH, show_default=True,
              help="The segment the guest writes (its --clockbound-shm).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def now(path: str, as_json: bool) -> None:
    """Show earliest and latest possible true time, the bound, the status and the segment's
    age. Times are CLOCK_REALTIME +- the bound: with `--clock software` the daemon's bound
    describes its software clock, not this machine's clock."""
    try:
        st = read_now(path)
    except (OSError, ValueError) as exc:
        msg = str(exc) if isinstance(exc, SegmentError) else f"{path}: {exc}"
        raise click.ClickException(f"cannot read the ClockBound segment: {msg}") from None
    if as_json:
        click.echo(json.dumps(st))
        return
    age = st["segment_age_s"]
    click.echo("\n".join([
        f"Status          : {st['status']}",
        f"Earliest        : {_iso(st['earliest_ns'])}",
        f"Latest          : {_iso(st['latest_ns'])}",
        f"Bound           : +-{st['bound_s']:.9f} s (published {st['published_bound_s']:.9f} s"
        f", max drift {st['max_drift_ppb']} ppb)",
        f"Segment age     : {'never written' if age is None else f'{age:.3f} s'}",
    ]))
