"""What the sans-IO controller asks its driver to do, and the status it reports.

The daemon (asyncio, real clock) and the simulator (virtual time) both apply these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from timesyncd.clock import KernelStatus


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send ``data`` (an NTP packet) to ``source`` now; report the send time via ``on_sent``."""

    source: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SetFrequency:
    """Set the clock's total frequency correction (base + slew), ppm; positive speeds it up."""

    ppm: float


@dataclass(frozen=True, slots=True)
class StepClock:
    """Add ``offset_ns`` to the clock at once (positive: forward)."""

    offset_ns: int


@dataclass(frozen=True, slots=True)
class SetKernelStatus:
    status: KernelStatus


Action = SendRequest | SetFrequency | StepClock | SetKernelStatus


@dataclass(slots=True)
class SourceStatus:
    name: str
    # The configured trust level, "host" or "authenticated": what the step policy and the
    # trust bound act on. Whether replies are NTS-verified is the driver's to say (the
    # daemon's status key ``authenticated``); the controller never claims it.
    trust: str = "host"
    reachable: bool = False
    selected: bool = False
    offset_s: float | None = None  # guest minus this source, last filtered sample
    delay_s: float | None = None
    jitter_s: float | None = None
    stratum: int | None = None
    samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    note: str = ""  # e.g. why a source is unusable
    # chronyc-sources columns, filled in by GuestController.status()
    reach: int = 0  # 8-bit register: bit 0 the last request answered
    poll: int | None = None  # log2 seconds of the poll interval in use
    last_rx: float | None = None  # Unix seconds (disciplined clock) of the last sample
    error_s: float | None = None  # the last sample's root distance (the "+/-" column)
    freq_ppm: float | None = None  # this source's frequency estimate of the clock


@dataclass(slots=True)
class ControllerStatus:
    """The fields of ``timesync status --json`` that the controller knows (signs: guest - ref)."""

    state: str  # a guest_client.sync_state.SyncState value
    offset_s: float | None
    frequency_ppm: float  # estimated native rate error of the clock (positive: runs fast)
    root_distance_s: float | None  # chrony's meaning: around the estimate, not the reading
    poll_s: float
    last_update: float | None  # Unix seconds, clock time of the last clock update
    steps: int
    refused_jumps: int
    rejected: dict[str, int]
    sources: list[SourceStatus]
    holdover_s: float = 0.0  # seconds since the last update, while in holdover
    #: |clock reading - reference| <= this (guest_client.error_bound)
    error_bound_s: float | None = None
    error_bound_growth_ppm: float | None = None
    bound_verified: bool = True  # False after a link loss until a fresh sample agrees
    state_reason: str = ""  # a guest_client.sync_state.Reason value
    holdover_since: float | None = None  # Unix seconds (clock) of entering holdover
    disagreement_s: float = 0.0  # jump all usable sources keep reporting, refused
    disrupted: bool = False  # VMClock disruption / restore, until a sample confirms the clock
    disruption_cause: str = ""  # the last one's cause (guest_client.disruption)
    disruptions: int = 0
    step_decision: str = ""  # the step policy's last step or refusal, and why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
