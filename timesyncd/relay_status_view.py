"""The text view of a relay's ``/status`` document (``timesync status --relay``): one line
per guest like ``chronyc clients``, then the upstreams and NTS-KE endpoints with their reach.

Beside the guest's view (``status_view``); pure: a document in, text out.
"""

from __future__ import annotations

import time
from typing import Any


def _num(value: Any, scale: float, fmt: str, unit: str = "") -> str:
    return "-" if value is None else format(value * scale, fmt) + unit


def format_relay_status(doc: dict[str, Any], now: float | None = None) -> str:
    """One line per guest (like ``chronyc clients``), then one per upstream and NTS-KE
    endpoint with its reach register (octal, like ``chronyc sources``; ``*`` before the
    name: unreachable)."""
    now = time.time() if now is None else now
    relay = doc.get("relay", {})
    lines = [f"Relay           : {relay.get('connections_open', '?')} connections, "
             f"{len(doc['guests'])} guests, {relay.get('connections_refused', 0)} refused",
             "",
             f"{'guest':22} {'name':20} {'state':14} {'offset':>12} {'freq ppm':>10} "
             f"{'error bnd':>11} {'poll':>6} {'updated':>9} {'report':>7} {'rejected':>8}"]
    for g in doc["guests"]:
        r = g.get("report") or {}
        last = r.get("last_update")
        updated = "-" if last is None else f"{max(now - last, 0):.0f}s"
        age = g.get("report_age_s")
        lines.append(
            f"{str(g.get('guest'))[:22]:22} {str(g.get('name'))[:20]:20} "
            f"{str(r.get('state', 'no report'))[:14]:14} "
            f"{_num(r.get('offset_s'), 1e6, '+.1f', 'us'):>12} "
            f"{_num(r.get('frequency_ppm'), 1, '+.3f'):>10} "
            f"{_num(r.get('root_distance_s'), 1e6, '.1f', 'us'):>11} "
            f"{_num(r.get('poll_s'), 1, 'g', 's'):>6} {updated:>9} "
            f"{_num(age, 1, '.0f', 's'):>7} {sum((r.get('rejected') or {}).values()):>8}")
    ups = doc.get("upstreams") or []
    if ups:
        lines += ["", f"{'upstream':32} {'reach':>5} {'last rx':>8} {'requests':>9} "
                      f"{'replies':>9} {'timeouts':>9} {'errors':>7} {'stale':>6} "
                      f"{'mean rtt':>10}"]
        for u in ups:
            rtt = u.get("mean_rtt_s")
            lines.append(f"{_name(u)} {_reach(u)} {u.get('requests', 0):>9} "
                         f"{u.get('replies', 0):>9} {u.get('timeouts', 0):>9} "
                         f"{sum((u.get('errors') or {}).values()):>7} {u.get('stale', 0):>6} "
                         f"{_num(rtt, 1e6, '.1f', 'us'):>10}")
    kes = doc.get("nts_ke_endpoints") or []
    if kes:
        lines += ["", f"{'NTS-KE endpoint':32} {'reach':>5} {'last ok':>8}"]
        lines += [f"{_name(k)} {_reach(k)}" for k in kes]
    return "\n".join(lines)


def _name(entry: dict[str, Any]) -> str:
    """The endpoint's name, marked with ``*`` while it is unreachable."""
    mark = "*" if entry.get("reachable") is False else ""
    return f"{(mark + str(entry.get('name')))[:32]:32}"


def _reach(entry: dict[str, Any]) -> str:
    """chrony-style octal reach register and seconds since the last reply."""
    return (f"{str(entry.get('reach', '-')):>5} "
            f"{_num(entry.get('last_reply_age_s'), 1, '.0f', 's'):>8}")
