"""The guest's status report: one typed value shared by the daemon (which builds it), the
status socket and ``timesync status --json`` (its JSON form), the text views and wait-sync.

The wire format is the JSON object older daemons sent: the same field names, optional sections
(``relay``, ``forward_ntp``, ``clockbound``, ``start_frequency``, ``daemon_errors``,
``true_offset_s``, a source's ``nts``) present only when they apply, plus ``version``.
:meth:`StatusReport.from_json` accepts older and newer daemons: missing fields take their
defaults and unknown ones are kept in ``extra`` and written back unchanged, so a field a later
daemon adds (e.g. VMClock's) needs one dataclass field here and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

#: bumped when a field changes meaning or disappears (adding one does not)
STATUS_VERSION = 1

_T = TypeVar("_T")


def _pick(cls: type[_T], doc: Mapping[str, Any]) -> tuple[_T, dict[str, Any]]:
    """An instance from the keys ``cls`` knows, and the keys it does not."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in doc.items() if k in names and k != "extra"}
    return cls(**known), {k: v for k, v in doc.items() if k not in names}


@dataclass(slots=True)
class SourceReport:
    """One source's row (``chronyc sources`` columns plus trust, rejections and NTS state)."""

    name: str = "?"
    trust: str = "host"  # configured trust: "host" or "authenticated"
    authenticated: bool = False  # replies are cryptographically verified (NTS)
    reachable: bool = False
    selected: bool = False
    offset_s: float | None = None  # guest minus this source, last filtered sample
    delay_s: float | None = None
    jitter_s: float | None = None
    stratum: int | None = None
    samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    note: str = ""
    reach: int | None = None
    poll: int | None = None
    last_rx: float | None = None
    error_s: float | None = None
    freq_ppm: float | None = None
    nts: dict[str, Any] | None = None  # NTS sources only
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SourceReport:
        report, extra = _pick(cls, doc)
        report.extra = extra
        return report

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if out["nts"] is None:
            del out["nts"]
        out.update(self.extra)
        return out


@dataclass(slots=True)
class RelayLinkReport:
    """The guest's link to the host relay."""

    address: str = ""
    connected: bool = False
    connects: int = 0
    upstreams: list[str] = field(default_factory=list)
    pending: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None


@dataclass(slots=True)
class TimeFloorReport:
    date: str = ""  # ISO 8601
    source: str = ""


@dataclass(slots=True)
class StartFrequencyReport:
    ppm: float = 0.0
    reason: str = ""


#: optional sections: left out of the JSON form when None (daemon_errors: when empty)
_OPTIONAL = ("true_offset_s", "relay", "forward_ntp", "vmclock", "clockbound",
             "start_frequency", "daemon_errors")


@dataclass(slots=True)
class StatusReport:
    """What ``timesync status --json`` prints (signs: guest minus reference)."""

    state: str = "unknown"  # a guest_client.sync_state.SyncState value
    offset_s: float | None = None
    frequency_ppm: float | None = None
    root_distance_s: float | None = None
    poll_s: float | None = None
    last_update: float | None = None
    steps: int | None = None
    refused_jumps: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    sources: list[SourceReport] = field(default_factory=list)
    holdover_s: float = 0.0
    error_bound_s: float | None = None
    error_bound_growth_ppm: float | None = None
    bound_verified: bool = True
    state_reason: str = ""
    holdover_since: float | None = None
    disagreement_s: float = 0.0
    disrupted: bool = False  # VMClock disruption / restore, until a sample confirms the clock
    disruption_cause: str = ""  # the last one's cause (guest_client.disruption)
    disruptions: int = 0
    step_decision: str = ""  # the step policy's last step or refusal, and why
    # the chronyc-tracking fields (guest_client.tracking)
    stratum: int | None = None
    reference: str | None = None
    leap_status: str = "-"
    rms_offset_s: float | None = None
    skew_ppm: float | None = None
    residual_freq_ppm: float | None = None
    remaining_correction_s: float | None = None
    # what the daemon adds
    clock: str = ""
    time_floor: TimeFloorReport | None = None
    true_offset_s: float | None = None  # software clock only: its offset from the machine's
    relay: RelayLinkReport | None = None
    forward_ntp: dict[str, Any] | None = None
    vmclock: dict[str, Any] | None = None  # the VMClock monitor (guest_client.vmclock_watch)
    clockbound: dict[str, Any] | None = None
    start_frequency: StartFrequencyReport | None = None
    daemon_errors: dict[str, int] = field(default_factory=dict)
    version: int = STATUS_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bound_s(self) -> float | None:
        """The error bound: ``error_bound_s`` where the daemon reports it, else root distance."""
        return self.error_bound_s if self.error_bound_s is not None else self.root_distance_s

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StatusReport:
        """The report a daemon sent (older daemons: no ``version``, fewer fields)."""
        report, extra = _pick(cls, doc)
        report.extra = extra
        if "version" not in doc:
            report.version = 0
        report.sources = [SourceReport.from_json(s) for s in (doc.get("sources") or [])
                          if isinstance(s, Mapping)]
        if isinstance(doc.get("relay"), Mapping):
            report.relay = _pick(RelayLinkReport, doc["relay"])[0]
        if isinstance(doc.get("time_floor"), Mapping):
            report.time_floor = _pick(TimeFloorReport, doc["time_floor"])[0]
        if isinstance(doc.get("start_frequency"), Mapping):
            report.start_frequency = _pick(StartFrequencyReport, doc["start_frequency"])[0]
        report.rejected = dict(report.rejected or {})
        report.daemon_errors = dict(report.daemon_errors or {})
        return report

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in _OPTIONAL and (
                    value is None or (f.name == "daemon_errors" and not value))):
                continue
            if f.name == "sources":
                value = [s.to_json() for s in value]
            elif isinstance(value, RelayLinkReport | TimeFloorReport | StartFrequencyReport):
                value = asdict(value)
            out[f.name] = value
        out.update(self.extra)
        return out
