"""Presenting drift-sim results: text tables, the ``--json`` document, ``--csv`` series, ``--plot``.

CSV columns (one row per sample instant and strategy, ``--csv FILE``):
``strategy,time_s,day,offset_s,rejected_total`` where ``time_s`` is true seconds since the start,
``offset_s`` the guest clock minus true time at that instant and ``rejected_total`` the number of
valid tokens wrongly rejected (all kinds) up to that instant.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from sim.tokens import KINDS, KindTally

DAY_S = 86_400.0
FloatArray = npt.NDArray[np.float64]


@dataclass
class StrategyResult:
    """What one strategy did to the guest clock and to token validation."""

    name: str
    times_s: FloatArray  # sample instants, true seconds since start
    offsets_s: FloatArray  # guest minus true time at those instants
    max_abs_offset_s: float
    offset_at_day_end_s: list[float]
    tokens: dict[str, KindTally]
    forward_jumps: int = 0
    backward_jumps: int = 0
    jumps_s: list[float] = field(default_factory=list)  # signed clock steps, seconds
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. controller status counters
    wall_s: float = 0.0

    @property
    def first_rejection_s(self) -> float | None:
        firsts = [t.first_rejection_s for t in self.tokens.values()
                  if t.first_rejection_s is not None]
        return min(firsts) if firsts else None

    def to_json(self) -> dict[str, Any]:
        fwd = [j for j in self.jumps_s if j > 0]
        bwd = [j for j in self.jumps_s if j < 0]
        return {
            "max_abs_offset_s": self.max_abs_offset_s,
            "forward_jumps": self.forward_jumps,
            "backward_jumps": self.backward_jumps,
            "max_forward_jump_s": max(fwd) if fwd else 0.0,
            "max_backward_jump_s": -min(bwd) if bwd else 0.0,
            "rejected": {k: t.rejected for k, t in self.tokens.items()},
            "accepted_expired": {k: t.accepted_expired for k, t in self.tokens.items()},
            "issued": {k: t.issued for k, t in self.tokens.items()},
            "first_rejection_s": self.first_rejection_s,
            "first_rejection_by_kind_s": {k: t.first_rejection_s
                                          for k, t in self.tokens.items()},
            "offset_at_day_end_s": self.offset_at_day_end_s,
            **self.extra,
            "wall_s": round(self.wall_s, 3),
        }


def fmt_offset(s: float) -> str:
    """Human-readable signed offset with a unit that fits (ns .. s)."""
    a = abs(s)
    if a >= 1.0:
        return f"{s:+.3f} s"
    if a >= 1e-3:
        return f"{s * 1e3:+.3f} ms"
    if a >= 1e-6:
        return f"{s * 1e6:+.1f} us"
    return f"{s * 1e9:+.0f} ns"


def fmt_when(s: float | None) -> str:
    if s is None:
        return "never"
    return f"day {s / DAY_S:.2f} ({s / 3600:.1f} h)"


#: Daily offsets beyond this many are shown as the first and last few and the worst day.
MAX_DAYS_LISTED = 10
_EDGE = 3


def day_list(offsets: Sequence[float]) -> str:
    """``d1 -1.1 s  d2 ...`` in full up to :data:`MAX_DAYS_LISTED` days, else shortened."""
    items = [f"d{i + 1} {fmt_offset(o)}" for i, o in enumerate(offsets)]
    if len(items) <= MAX_DAYS_LISTED:
        return "  ".join(items)
    worst = max(range(len(offsets)), key=lambda i: abs(offsets[i]))
    return ("  ".join(items[:_EDGE]) + "  ...  " + "  ".join(items[-_EDGE:])
            + f"  (worst {items[worst]}; all {len(items)} days in --json)")


def write_tables(results: Mapping[str, StrategyResult], out: TextIO,
                 scenario_line: str = "") -> None:
    if scenario_line:
        out.write(scenario_line + "\n")
    for r in results.values():
        out.write(f"\n== {r.name} ==\n")
        out.write("  offset at end of day: " + day_list(r.offset_at_day_end_s) + "\n")
        out.write(f"  max |offset|:         {fmt_offset(r.max_abs_offset_s).lstrip('+')}\n")
        js = r.to_json()
        out.write(f"  jumps:                {r.forward_jumps} forward (max "
                  f"{fmt_offset(js['max_forward_jump_s'])}), {r.backward_jumps} backward (max "
                  f"{fmt_offset(-js['max_backward_jump_s'])})\n")
        out.write(f"  {'tokens':<8}{'issued':>9}{'wrongly rejected':>18}"
                  f"{'expired accepted':>18}  first rejection\n")
        for kind in KINDS:
            t = r.tokens.get(kind)
            if t is None:
                continue
            out.write(f"  {kind:<8}{t.issued:>9}{t.rejected:>18}{t.accepted_expired:>18}  "
                      f"{fmt_when(t.first_rejection_s)}\n")
        out.write(f"  first rejection:      {fmt_when(r.first_rejection_s)}\n")
        for key, value in r.extra.items():
            out.write(f"  {key}: {value}\n")


def write_csv(results: Mapping[str, StrategyResult], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "time_s", "day", "offset_s", "rejected_total"])
        for r in results.values():
            rej = np.sort(np.concatenate(
                [t.rejection_times_s for t in r.tokens.values()] or [np.zeros(0)]))
            counts = np.searchsorted(rej, r.times_s, side="right")
            for t, o, c in zip(r.times_s, r.offsets_s, counts, strict=True):
                w.writerow([r.name, f"{t:.3f}", f"{t / DAY_S:.5f}", f"{o:.9e}", int(c)])


def write_plot(results: Mapping[str, StrategyResult], path: str | Path, title: str = "") -> None:
    """Offset over time per strategy (one panel each: their scales differ by 1e6), rejections
    marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional extra
        raise RuntimeError("--plot needs matplotlib: pip install 'timesync[plot]'") from exc
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.8 * n + 0.6), sharex=True, squeeze=False)
    colours = {"none": "tab:red", "step": "tab:orange", "discipline": "tab:green"}
    for ax, r in zip(axes[:, 0], results.values(), strict=True):
        days = r.times_s / DAY_S
        scale, unit = _unit(r.max_abs_offset_s)
        ax.plot(days, r.offsets_s * scale, lw=0.8, color=colours.get(r.name, "tab:blue"),
                label=f"{r.name}: guest - true")
        ax.axhline(0.0, color="grey", lw=0.5)
        marked = False
        for kind, marker in zip(KINDS, ("v", "x", "+"), strict=True):
            t = r.tokens.get(kind)
            if t is None or not len(t.rejection_times_s):
                continue
            rt = t.rejection_times_s
            if len(rt) > 400:
                rt = rt[:: math.ceil(len(rt) / 400)]
            y = np.interp(rt, r.times_s, r.offsets_s) * scale
            ax.plot(rt / DAY_S, y, marker, ms=4, ls="none", color="black", alpha=0.6,
                    label=f"{kind} wrongly rejected ({t.rejected})")
            marked = True
        first = r.first_rejection_s
        if first is not None:
            ax.axvline(first / DAY_S, color="black", ls=":", lw=0.8)
        ax.set_ylabel(f"offset ({unit})")
        ax.grid(True, alpha=0.3)
        summary = f"max |offset| {fmt_offset(r.max_abs_offset_s).lstrip('+')}"
        if r.forward_jumps or r.backward_jumps:
            summary += f", jumps {r.forward_jumps} fwd / {r.backward_jumps} back"
        summary += f", first rejection {fmt_when(first)}" if marked else ", no rejections"
        ax.set_title(f"{r.name}: {summary}", fontsize=10, loc="left")
        ax.legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xlabel("true time (days)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _unit(max_abs: float) -> tuple[float, str]:
    if max_abs >= 1.0:
        return 1.0, "s"
    if max_abs >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"
