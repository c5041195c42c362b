"""Assemble the daemon's :class:`~timesyncd.status_report.StatusReport` from the controller and
the transport pieces the daemon owns (relay link, NTS, forwarder, ClockBound writer).

Kept out of ``daemon.py`` so the driver stays about I/O; sans-IO: it reads values, never
sockets or the wall clock (``now_ns`` is the disciplined clock's reading, passed in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

from timesyncd.status_report import (
    RelayLinkReport,
    SourceReport,
    StartFrequencyReport,
    StatusReport,
    TimeFloorReport,
)

if TYPE_CHECKING:
    from guest_client.clockbound_writer import SegmentPublisher
    from guest_client.controller import GuestController
    from guest_client.forward_ntp import NtpForwarder
    from guest_client.freq_file import StartFrequency
    from guest_client.relay_link import RelayLink
    from timesyncd.time_floor import TimeFloor

_NS = 1_000_000_000


def build_status(controller: GuestController, now_ns: int, *, clock: str,
                 floor: TimeFloor, true_offset_ns: int | None = None,
                 link: RelayLink | None = None, forwarder: NtpForwarder | None = None,
                 clockbound: SegmentPublisher | None = None,
                 vmclock: Mapping[str, Any] | None = None,
                 nts: Mapping[str, dict[str, Any]] | None = None,
                 start_frequency: StartFrequency | None = None,
                 daemon_errors: Mapping[str, int] | None = None) -> StatusReport:
    """The ``timesync status`` report at ``now_ns``."""
    tracking = controller.tracking(now_ns)  # before status(): fills the source columns
    st = controller.status(now_ns)
    report = StatusReport(**{f.name: getattr(st, f.name) for f in fields(st)
                             if f.name != "sources"}, **asdict(tracking))
    nts = nts or {}
    for src in st.sources:
        row = SourceReport(**{f.name: getattr(src, f.name) for f in fields(src)})
        # authenticated: replies are cryptographically verified before use (NTS only)
        row.authenticated = row.name in nts
        info = nts.get(row.name)
        if info is not None:
            row.nts = info
            if info["note"] and not row.note:
                row.note = str(info["note"])
        report.sources.append(row)
    if true_offset_ns is not None:
        report.true_offset_s = true_offset_ns / _NS
    report.clock = clock
    report.time_floor = TimeFloorReport(floor.datetime.isoformat(), floor.source)
    if link is not None:
        report.relay = RelayLinkReport(
            address=link.address, connected=link.connected, connects=link.connects,
            upstreams=[u.name for u in link.upstreams], pending=link.pending,
            errors=dict(link.counters), last_error=link.last_error)
    if vmclock is not None:
        report.vmclock = dict(vmclock)
    if forwarder is not None:
        report.forward_ntp = forwarder.stats()
    if clockbound is not None:
        w = clockbound.writer
        report.clockbound = {"path": w.path, "fence": w.fence_kind,
                             "errors": clockbound.errors, **dict(w.counters)}
    if start_frequency is not None:
        report.start_frequency = StartFrequencyReport(start_frequency.ppm,
                                                      start_frequency.reason)
    report.daemon_errors = dict(daemon_errors or {})
    return report
