"""drift-sim at scale: long per-day lists shortened, a table across seeds, outputs checked first.

A year prints 365 daily offsets and ``--seeds 1-20`` twenty reports; what a reader needs is the
shape (first and last days, the worst one) and, across seeds, the median and the worst case.
Output paths and optional dependencies are checked before a run that can take minutes.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from sim.report import StrategyResult, fmt_offset, fmt_when


def check_outputs(csv_path: str | None, plot_path: str | None) -> None:
    """Raise ValueError naming the option if an output cannot be written or ``--plot``'s
    matplotlib is missing, so a long run does not end in that error."""
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'timesync[plot]'")
    for option, path in (("--csv", csv_path), ("--plot", plot_path)):
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"{option}: {path} is a directory")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise ValueError(f"{option}: directory {parent} does not exist")
        if (p.exists() and not os.access(p, os.W_OK)) or not os.access(parent, os.W_OK):
            raise ValueError(f"{option}: {path} is not writable")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def seed_summary(runs: Mapping[int, Mapping[str, StrategyResult]]) -> dict[str, Any]:
    """Per strategy, the median and worst over seeds of what the per-seed report shows."""
    out: dict[str, Any] = {}
    strategies = next(iter(runs.values())).keys() if runs else []
    for name in strategies:
        rs = [r[name] for r in runs.values()]
        firsts = [r.first_rejection_s for r in rs]
        known = [f for f in firsts if f is not None]
        as_inf = [math.inf if f is None else f for f in firsts]
        med_first = _median(as_inf)
        rej = [sum(t.rejected for t in r.tokens.values()) for r in rs]
        exp = [sum(t.accepted_expired for t in r.tokens.values()) for r in rs]
        maxes = [r.max_abs_offset_s for r in rs]
        out[name] = {
            "seeds": len(rs),
            "max_abs_offset_s": {"median": _median(maxes), "worst": max(maxes)},
            "rejected_total": {"median": _median(rej), "worst": max(rej)},
            "accepted_expired_total": {"median": _median(exp), "worst": max(exp)},
            "first_rejection_s": {"median": None if math.isinf(med_first) else med_first,
                                  "earliest": min(known) if known else None,
                                  "seeds_with_rejections": len(known)},
        }
    return out


def write_seed_summary(summary: Mapping[str, Any], out: TextIO) -> None:
    n = max((s["seeds"] for s in summary.values()), default=0)
    out.write(f"\nsummary over {n} seeds (median / worst)\n")
    out.write(f"  {'strategy':<12}{'max |offset|':>24}{'wrongly rejected':>20}"
              f"{'expired accepted':>20}  first rejection (median / earliest)\n")
    fmt: Callable[[float], str] = lambda s: fmt_offset(s).lstrip("+")  # noqa: E731
    for name, s in summary.items():
        m, r, e, f = (s["max_abs_offset_s"], s["rejected_total"], s["accepted_expired_total"],
                      s["first_rejection_s"])
        offsets = f"{fmt(m['median'])} / {fmt(m['worst'])}"
        out.write(f"  {name:<12}{offsets:>24}{_count(r):>20}{_count(e):>20}  "
                  f"{fmt_when(f['median'])} / {fmt_when(f['earliest'])} "
                  f"({f['seeds_with_rejections']} of {s['seeds']} seeds)\n")


def _count(d: Mapping[str, float]) -> str:
    return f"{d['median']:g} / {d['worst']:g}"
