"""Guest health reports (HEALTH frames): schema, strict parsing and pacing. Sans-IO.

The guest tells the relay how its clock is doing so the host can watch every enclave without
a metrics collector inside it. A report is advisory: the relay validates it as untrusted
input, keeps the last one per connection for metrics and status, and never lets it affect
forwarding. Reports are small (bounded field count and sizes) and paced (at most one per
``min_interval`` and at least one per ``interval`` while connected).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from timesyncd import framing
from timesyncd.framing import Frame, FrameType
from timesyncd.reasons import StateReason
from timesyncd.status_report import StatusReport

#: Version 1 reports may carry the optional fields added later (error_bound_s and friends):
#: old relays ignore unknown keys, new relays treat missing ones as unknown (None), so the
#: version stays 1 and old and new guests and relays keep working together. The disrupted
#: state (VMClock, restore) travels the same way: state ``unsynchronised`` (which every relay
#: accepts) with reason ``disrupted`` (an older relay shows it as ``other``) and the optional
#: ``disrupted``/``disruptions`` fields.
SCHEMA_VERSION = 1
STATES = ("unsynchronised", "synchronised", "holdover")
#: the state reasons (timesyncd.reasons); anything else is reported as "other".
REASONS = tuple(str(r) for r in StateReason)
#: Distinct rejection reasons kept per report; the rest are summed under ``other``.
MAX_REASONS = 24
#: Reason keys are label values on the host: short, printable, no surprises.
_REASON_RE = re.compile(r"^[A-Za-z0-9_:.\-]{1,48}$")
#: Counts above this are refused: exact in a float (what Prometheus stores), and no guest
#: counts that far.
MAX_COUNT = 2**53 - 1
_NUMERIC = ("offset_s", "frequency_ppm", "root_distance_s", "last_update", "poll_s",
            "holdover_s", "error_bound_s", "holdover_since", "disagreement_s")


class HealthError(ValueError):
    """A report the relay refuses; ``reason`` is a counter key (``health_<reason>``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class HealthReport:
    """What a guest says about its clock (signs: guest minus reference, as in status)."""

    state: str
    offset_s: float | None = None
    frequency_ppm: float | None = None
    #: chrony's root distance: around the estimate (root delay/2 + dispersions, growing)
    root_distance_s: float | None = None
    #: guest clock, Unix seconds, of the last clock update (None: never updated)
    last_update: float | None = None
    poll_s: float | None = None
    holdover_s: float = 0.0
    steps: int = 0
    refused_jumps: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    #: |clock reading - reference| bound (guest_client.error_bound); None from older guests
    error_bound_s: float | None = None
    state_reason: str | None = None
    bound_verified: bool | None = None
    holdover_since: float | None = None
    disagreement_s: float | None = None
    disrupted: bool | None = None  # None from older guests
    disruptions: int = 0  # disruptions acted on (VMClock marker/generation, restores)

    @classmethod
    def from_report(cls, report: StatusReport) -> HealthReport:
        """The part of the guest's typed status report the relay turns into metrics."""
        return cls(
            state=report.state,
            offset_s=report.offset_s,
            frequency_ppm=report.frequency_ppm,
            root_distance_s=report.root_distance_s,
            last_update=report.last_update,
            poll_s=report.poll_s,
            holdover_s=float(report.holdover_s or 0.0),
            steps=int(report.steps or 0),
            refused_jumps=int(report.refused_jumps or 0),
            rejected=bound_reasons(report.rejected or {}),
            error_bound_s=report.error_bound_s,
            state_reason=report.state_reason or None,
            bound_verified=report.bound_verified,
            holdover_since=report.holdover_since,
            disagreement_s=report.disagreement_s,
            disrupted=report.disrupted,
            disruptions=int(report.disruptions or 0),
        )

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> HealthReport:
        """Build from a status object in JSON form (``timesync status --json``)."""
        return cls.from_report(StatusReport.from_json(status))

    def to_json(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, **asdict(self)}

    def frame(self) -> Frame:
        """The HEALTH frame carrying this report (request id 0: nothing answers it)."""
        return framing.json_frame(FrameType.HEALTH, 0, self.to_json())


def bound_reasons(rejected: Mapping[str, Any]) -> dict[str, int]:
    """Keep the ``MAX_REASONS - 1`` largest well-named counts; fold the rest into ``other``."""
    clean: dict[str, int] = {}
    other = 0
    for key, value in rejected.items():
        if not _is_count(value):
            continue
        if isinstance(key, str) and _REASON_RE.match(key):
            clean[key] = value
        else:
            other += value
    if len(clean) >= MAX_REASONS:
        ranked = sorted(clean.items(), key=lambda kv: (-kv[1], kv[0]))
        clean = dict(ranked[: MAX_REASONS - 1])
        other += sum(v for _, v in ranked[MAX_REASONS - 1 :])
    if other:
        clean["other"] = clean.get("other", 0) + other
    return clean


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _is_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def parse_health(payload: bytes) -> HealthReport:
    """Validate a HEALTH payload from an untrusted guest; :class:`HealthError` if refused."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise HealthError("bad_json", "HEALTH payload is not JSON") from exc
    if not isinstance(obj, dict):
        raise HealthError("bad_schema", "HEALTH payload is not an object")
    if obj.get("version") != SCHEMA_VERSION:
        raise HealthError("bad_version", f"schema version {str(obj.get('version'))[:20]}")
    state = obj.get("state")
    if state not in STATES:
        raise HealthError("bad_state", f"state {str(state)[:40]!r}")
    values: dict[str, Any] = {"state": state}
    for key in _NUMERIC:
        value = obj.get(key)
        if value is None:
            continue
        if not _is_finite(value):
            raise HealthError("bad_field", f"{key} is not a finite number")
        values[key] = float(value)
    for key in ("steps", "refused_jumps", "disruptions"):
        value = obj.get(key, 0)
        if not _is_count(value):
            raise HealthError("bad_field", f"{key} is not a count (0 to 2**53 - 1)")
        values[key] = value
    rejected = obj.get("rejected", {})
    if not isinstance(rejected, dict):
        raise HealthError("bad_field", "rejected is not an object")
    values["rejected"] = bound_reasons(rejected)
    reason = obj.get("state_reason")
    if reason is not None:
        values["state_reason"] = reason if reason in REASONS else "other"
    for key in ("bound_verified", "disrupted"):
        flag = obj.get(key)
        if flag is not None:
            if not isinstance(flag, bool):
                raise HealthError("bad_field", f"{key} is not a boolean")
            values[key] = flag
    return HealthReport(**values)


class HealthPacer:
    """When to send the next report: every ``interval_s``, sooner on a state change, never
    more often than ``min_interval_s``. Times are monotonic ns supplied by the driver."""

    def __init__(self, interval_s: float, min_interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s: must be positive (disable reporting instead)")
        self.interval_ns = int(interval_s * 1e9)
        self.min_interval_ns = min(int(min_interval_s * 1e9), self.interval_ns)
        self._last_ns: int | None = None
        self._last_state: str | None = None

    def reset(self) -> None:
        """A new connection: the next report goes out as soon as it is asked for."""
        self._last_ns = None
        self._last_state = None

    def due(self, now_ns: int, state: str) -> bool:
        if self._last_ns is None:
            return True
        elapsed = now_ns - self._last_ns
        if elapsed >= self.interval_ns:
            return True
        return state != self._last_state and elapsed >= self.min_interval_ns

    def sent(self, now_ns: int, state: str) -> None:
        self._last_ns = now_ns
        self._last_state = state

    def next_check_ns(self, now_ns: int) -> int:
        """Latest time the driver should look again (state changes may make it due sooner)."""
        if self._last_ns is None:
            return now_ns
        return max(now_ns, self._last_ns + self.min_interval_ns)
