"""The text views of ``timesync status``: ``chronyc tracking`` fields, then a ``chronyc
sources``-style table; numbers people read are in units chosen by magnitude."""

from __future__ import annotations

import textwrap
import time
from typing import Any

#: chrony's source-state characters (``chronyc sources``)
STATES = {
    "*": "the reference: selected, smallest error",
    "+": "selected and combined with the reference",
    "-": "usable but not combined (e.g. outside the authenticated sources' bounds)",
    "x": "falseticker: disagrees with the majority",
    "?": "unreachable, or no usable sample yet",
}

LEGEND = """\
  .-- Source state: * reference (selected, smallest error), + combined with it,
  |   - usable but not combined, x falseticker, ? unreachable or no usable sample yet
  | .- Trust: A authenticated (NTS), H host-trusted (kept within authenticated bounds)
  | |
  | |  Stratum: the source's.  Poll: log2 of the poll interval, seconds.
  | |  Reach: octal register of the last 8 polls (377: all answered).
  | |  LastRx: age of the last good sample.  Offset: guest minus source (last sample),
  | |  +/- its error (root distance).  Delay: the round trip.
  | |"""

NAME_WIDTH = 30


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


def state_char(src: dict[str, Any], reference: str | None) -> str:
    """One source's selection state, chrony's ``* + - x ?``."""
    if src.get("selected"):
        return "*" if src.get("name") == reference else "+"
    if src.get("note") == "falseticker":
        return "x"
    if src.get("reachable") and src.get("samples"):
        return "-"
    return "?"


def format_tracking(st: dict[str, Any], now: float) -> list[str]:
    last = st.get("last_update")
    bound_key = "error_bound_s" if "error_bound_s" in st else "root_distance_s"
    freq = st.get("frequency_ppm")
    lines = [
        f"Reference       : {st.get('reference') or '-'}",
        f"Stratum         : {st.get('stratum') if st.get('stratum') is not None else '-'}",
        f"State           : {st.get('state')}"
        + (f" ({st['state_reason']})" if st.get("state_reason") else ""),
        f"Leap status     : {st.get('leap_status', '-')}",
        f"System time     : {human(st.get('remaining_correction_s'), digits=3)} "
        "(remaining correction, guest minus reference)",
        f"Last offset     : {human(st.get('offset_s'), digits=3)} (corrected at the last update)",
        f"RMS offset      : {human(st.get('rms_offset_s'), signed=False, digits=3)}",
        "Frequency       : " + ("-" if freq is None else
                                f"{abs(freq):.3f} ppm {'fast' if freq >= 0 else 'slow'}")
        + " (native rate error)",
        "Residual freq   : " + _ppm(st.get("residual_freq_ppm")),
        "Skew            : " + _ppm(st.get("skew_ppm"), signed=False),
        f"{'Error bound' if bound_key == 'error_bound_s' else 'Root distance':16}: "
        f"{human(st.get(bound_key), signed=False, digits=3)}"
        + ("" if st.get("bound_verified", True) else " (unverified since a link loss)"),
        f"Poll interval   : {_poll(st.get('poll_s'))}",
        f"Last update     : {'never' if not last else age(now - last) + ' ago'}",
        f"Steps           : {st.get('steps')}",
        f"Refused jumps   : {st.get('refused_jumps')}",
    ]
    if st.get("true_offset_s") is not None:
        lines.append(f"True offset     : {human(st['true_offset_s'], digits=3)} "
                     "(software clock vs machine)")
    if st.get("holdover_s"):
        lines.append(f"Holdover        : {age(st['holdover_s'])}")
    if st.get("step_decision"):  # the step policy's last word: why it stepped or refuses
        lines.append(f"Step decision   : {st['step_decision']}")
    vm = st.get("vmclock")
    if vm:
        lines.append(f"VMClock         : {vm.get('clock_status')}, leap {vm.get('leap_indicator')}"
                     f"; {vm.get('resets')} disruptions acted on, {vm.get('rate_limited')} "
                     f"rate-limited, generation {vm.get('vm_generation')}")
    relay = st.get("relay")
    if relay:
        errors = relay.get("errors") or {}
        lines.append(
            f"Relay link      : {relay.get('address')} "
            f"{'connected' if relay.get('connected') else 'DOWN'}, {relay.get('connects')} "
            "connects; " + (", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
                            or "no errors"))
        if relay.get("last_error"):
            lines.append(f"    last error: {relay['last_error']}")
    rejected = st.get("rejected") or {}
    lines.append("Rejected        : " + (
        ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none"))
    return lines


def format_sources(st: dict[str, Any], now: float, wide: bool = False,
                   verbose: bool = False) -> list[str]:
    sources = st.get("sources") or []
    width = max([NAME_WIDTH] + [len(s.get("name", "")) for s in sources]) if wide else NAME_WIDTH
    header = (f"S A {'Name':{width}} Stratum Poll Reach LastRx "
              f"{'Offset':>10} {'+/- error':>12} {'Delay':>10}")
    lines = ([LEGEND] if verbose else []) + [header, "=" * len(header)]
    for src in sources:
        name = src.get("name", "?")
        off, err = src.get("offset_s"), src.get("error_s")
        reach = src.get("reach")
        last_rx = src.get("last_rx")
        stratum = src.get("stratum")
        cols = (f"{'-' if stratum is None else stratum:>7} "
                f"{'-' if src.get('poll') is None else src['poll']:>4} "
                f"{'-' if reach is None else format(reach, 'o'):>5} "
                f"{age(None if last_rx is None else now - last_rx):>6} "
                f"{human(off):>10} {'-' if err is None else '+/- ' + human(err, signed=False):>12} "
                f"{human(src.get('delay_s'), signed=False):>10}")
        mark = f"{state_char(src, st.get('reference'))} {'A' if src.get('authenticated') else 'H'}"
        if len(name) <= width:
            lines.append(f"{mark} {name:{width}} {cols}")
        else:  # full name, wrapped; the columns follow on the last line
            parts = textwrap.wrap(name, width, break_on_hyphens=False) or [name]
            lines.extend(f"{mark if i == 0 else '   '} {p}" for i, p in enumerate(parts[:-1]))
            lines.append(f"{'   ' if len(parts) > 1 else mark} {parts[-1]:{width}} {cols}")
        if src.get("note") and src.get("note") != "falseticker":
            lines.append(f"      note: {src['note']}")
        if src.get("rejected"):
            lines.append("      rejected: " + ", ".join(
                f"{k}={v}" for k, v in sorted(src["rejected"].items())))
    return lines


def format_status(st: dict[str, Any], *, wide: bool = False, verbose: bool = False,
                  now: float | None = None) -> str:
    """Human view, like ``chronyc tracking`` followed by ``chronyc sources``."""
    now = time.time() if now is None else now
    return "\n".join(format_tracking(st, now) + [""] + format_sources(st, now, wide, verbose))


def _ppm(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else f"{value:{'+' if signed else ''}.3f} ppm"


def _poll(poll_s: float | None) -> str:
    return "-" if poll_s is None else f"{poll_s:g} s"
