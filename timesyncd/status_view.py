"""The text views of a :class:`~timesyncd.status_report.StatusReport` (``timesync status``):
``chronyc tracking`` fields, then a ``chronyc sources``-style table; numbers people read are in
units chosen by magnitude."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Mapping
from typing import Any

from timesyncd.status_report import SourceReport, StatusReport

#: chrony's source-state characters (``chronyc sources``)
STATES = {
    "*": "the reference: selected, smallest error",
    "+": "selected and combined with the reference",
    "-": "usable but not combined (e.g. outside the authenticated sources' bounds)",
    "x": "falseticker: disagrees with the majority",
    "~": "too variable: its jitter is far above the selected sources'",
    "?": "unreachable, or no usable sample yet",
}

LEGEND = """\
  .-- Source state: * reference (selected, smallest error), + combined with it,
  |   - usable but not combined, x falseticker, ~ too variable (jitter far above the
  |   selected sources'), ? unreachable or no usable sample yet
  | .- Trust: A authenticated (NTS), H host-trusted (kept within authenticated bounds)
  | |
  | |  Stratum: the source's.  Poll: log2 of the poll interval, seconds.
  | |  Reach: octal register of the last 8 polls (377: all answered).
  | |  LastRx: age of the last good sample.  Offset: guest minus source (last sample),
  | |  +/- its error (root distance).  Delay: the round trip.
  | |"""

NAME_WIDTH = 30
#: chrony's default maxjitter: a source whose jitter exceeds it is "too variable" (``~``)
MAX_JITTER_S = 1.0
#: ... as is one, not selected, whose jitter exceeds this many times the largest jitter of
#: the selected sources (chrony compares with an absolute limit only; the guest knows its
#: selected sources' jitter, which is the scale that matters on a LAN or over a relay)
TOO_VARIABLE_FACTOR = 10.0


def human(seconds: float | None, signed: bool = True, digits: int = 1) -> str:
    """``+12.3 us``, ``-4.5 ms``, ``+192.4 s``: the unit follows the magnitude."""
    if seconds is None:
        return "-"
    size = abs(seconds)
    scale, unit = ((1e9, "ns") if size < 1e-6 else (1e6, "us") if size < 1e-3
                   else (1e3, "ms") if size < 1.0 else (1.0, "s"))
    return f"{seconds * scale:{'+' if signed else ''}.{digits}f} {unit}"


def age(seconds: float | None) -> str:
    """``chronyc``-style age: 45s, 12m, 5h, 3d."""
    if seconds is None:
        return "-"
    s = max(seconds, 0.0)
    for limit, div, unit in ((600, 1, "s"), (36_000, 60, "m"), (345_600, 3600, "h")):
        if s < limit:
            return f"{s / div:.0f}{unit}"
    return f"{s / 86400:.0f}d"


def too_variable(src: SourceReport, sources: list[SourceReport]) -> bool:
    """chronyc's ``~``: a usable source left out because its samples scatter too much."""
    if src.selected or src.jitter_s is None or not src.samples:
        return False
    if src.jitter_s > MAX_JITTER_S:
        return True
    selected = [s.jitter_s for s in sources if s.selected and s.jitter_s is not None]
    return bool(selected) and src.jitter_s > TOO_VARIABLE_FACTOR * max(max(selected), 1e-9)


def state_char(src: SourceReport, report: StatusReport) -> str:
    """One source's selection state, chrony's ``* + - x ~ ?``."""
    if src.selected:
        return "*" if src.name == report.reference else "+"
    if src.note == "falseticker":
        return "x"
    if not (src.reachable and src.samples):
        return "?"
    return "~" if too_variable(src, report.sources) else "-"


def format_tracking(st: StatusReport, now: float) -> list[str]:
    last = st.last_update
    freq = st.frequency_ppm
    lines = [
        f"Reference       : {st.reference or '-'}",
        f"Stratum         : {st.stratum if st.stratum is not None else '-'}",
        f"State           : {st.state}" + (f" ({st.state_reason})" if st.state_reason else ""),
        f"Leap status     : {st.leap_status}",
        f"System time     : {human(st.remaining_correction_s, digits=3)} "
        "(remaining correction, guest minus reference)",
        f"Last offset     : {human(st.offset_s, digits=3)} (corrected at the last update)",
        f"RMS offset      : {human(st.rms_offset_s, signed=False, digits=3)}",
        "Frequency       : " + ("-" if freq is None else
                                f"{abs(freq):.3f} ppm {'fast' if freq >= 0 else 'slow'}")
        + " (native rate error)",
        "Residual freq   : " + _ppm(st.residual_freq_ppm),
        "Skew            : " + _ppm(st.skew_ppm, signed=False),
        f"{'Error bound' if st.error_bound_s is not None else 'Root distance':16}: "
        f"{human(st.bound_s, signed=False, digits=3)}"
        + ("" if st.bound_verified else " (unverified since a link loss)"),
        f"Poll interval   : {_poll(st.poll_s)}",
        f"Last update     : {'never' if not last else age(now - last) + ' ago'}",
        f"Steps           : {st.steps}",
        f"Refused jumps   : {st.refused_jumps}",
    ]
    if st.true_offset_s is not None:
        lines.append(f"True offset     : {human(st.true_offset_s, digits=3)} "
                     "(software clock vs machine)")
    if st.holdover_s:
        lines.append(f"Holdover        : {age(st.holdover_s)}")
    if st.step_decision:  # the step policy's last word: why it stepped or refuses
        lines.append(f"Step decision   : {st.step_decision}")
    vm = st.vmclock
    if vm:
        lines.append(f"VMClock         : {vm.get('clock_status')}, leap {vm.get('leap_indicator')}"
                     f"; {vm.get('resets')} disruptions acted on, {vm.get('rate_limited')} "
                     f"rate-limited, generation {vm.get('vm_generation')}")
    relay = st.relay
    if relay:
        lines.append(
            f"Relay link      : {relay.address} "
            f"{'connected' if relay.connected else 'DOWN'}, {relay.connects} "
            "connects; " + (", ".join(f"{k}={v}" for k, v in sorted(relay.errors.items()))
                            or "no errors"))
        if relay.last_error:
            lines.append(f"    last error: {relay.last_error}")
    lines.append("Rejected        : " + (
        ", ".join(f"{k}={v}" for k, v in sorted(st.rejected.items())) or "none"))
    return lines


def format_sources(st: StatusReport, now: float, wide: bool = False,
                   verbose: bool = False) -> list[str]:
    sources = st.sources
    width = max([NAME_WIDTH] + [len(s.name) for s in sources]) if wide else NAME_WIDTH
    header = (f"S A {'Name':{width}} Stratum Poll Reach LastRx "
              f"{'Offset':>10} {'+/- error':>12} {'Delay':>10}")
    lines = ([LEGEND] if verbose else []) + [header, "=" * len(header)]
    for src in sources:
        name, err, last_rx = src.name, src.error_s, src.last_rx
        cols = (f"{'-' if src.stratum is None else src.stratum:>7} "
                f"{'-' if src.poll is None else src.poll:>4} "
                f"{'-' if src.reach is None else format(src.reach, 'o'):>5} "
                f"{age(None if last_rx is None else now - last_rx):>6} "
                f"{human(src.offset_s):>10} "
                f"{'-' if err is None else '+/- ' + human(err, signed=False):>12} "
                f"{human(src.delay_s, signed=False):>10}")
        mark = f"{state_char(src, st)} {'A' if src.authenticated else 'H'}"
        if len(name) <= width:
            lines.append(f"{mark} {name:{width}} {cols}")
        else:  # full name, wrapped; the columns follow on the last line
            parts = textwrap.wrap(name, width, break_on_hyphens=False) or [name]
            lines.extend(f"{mark if i == 0 else '   '} {p}" for i, p in enumerate(parts[:-1]))
            lines.append(f"{'   ' if len(parts) > 1 else mark} {parts[-1]:{width}} {cols}")
        if src.note and src.note != "falseticker":
            lines.append(f"      note: {src.note}")
        if src.rejected:
            lines.append("      rejected: " + ", ".join(
                f"{k}={v}" for k, v in sorted(src.rejected.items())))
    return lines


def format_status(st: StatusReport | Mapping[str, Any], *, wide: bool = False,
                  verbose: bool = False, now: float | None = None) -> str:
    """Human view, like ``chronyc tracking`` followed by ``chronyc sources`` (a JSON status
    object is read with :meth:`StatusReport.from_json`)."""
    now = time.time() if now is None else now
    if not isinstance(st, StatusReport):
        st = StatusReport.from_json(st)
    return "\n".join(format_tracking(st, now) + [""] + format_sources(st, now, wide, verbose))


def _ppm(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else f"{value:{'+' if signed else ''}.3f} ppm"


def _poll(poll_s: float | None) -> str:
    return "-" if poll_s is None else f"{poll_s:g} s"
