"""One registry of the reason names the project counts, reports and documents.

Every rejection, error and state reason that reaches a status report, a health report, a log
field or a metric label is a member of one of these enums (``StrEnum``: the member *is* its
string, so counters, JSON and labels are unchanged). Names built at run time from a closed
family (``connect_<errno name>``, ``malformed:<packet error>``) are listed in
:data:`FAMILIES`. ``tests/test_reasons.py`` checks that the code names only registered
reasons and that the docs and the Prometheus alert rules name only real ones.
"""

from __future__ import annotations

import re
from enum import StrEnum


class StateReason(StrEnum):
    """Why the guest is in its state (``state_reason`` in status and health reports)."""

    STARTING = "starting"  # no clock update yet
    TRACKING = "tracking"  # synchronised
    CORRECTING = "correcting_offset"  # remaining correction above the threshold
    NO_RECENT_UPDATE = "no_recent_update"  # holdover: no update for holdover_polls polls
    BOUND_EXCEEDED = "bound_exceeded"  # error bound at or past max_error_s
    SOURCES_DISAGREE = "sources_disagree"  # every usable source reports a refused jump
    DISRUPTED = "disrupted"  # VMClock disruption or restore, until a sample confirms the clock


class ExchangeReason(StrEnum):
    """A server reply refused by the RFC 5905 checks (``timesyncd.exchange``)."""

    BAD_MODE = "bad_mode"
    DUPLICATE = "duplicate"
    UNSOLICITED = "unsolicited"
    ORIGIN_MISMATCH = "origin_mismatch"
    BAD_DELAY = "bad_delay"
    ROOT_DISTANCE = "root_distance"
    BAD_STRATUM = "bad_stratum"
    UNSYNCHRONISED = "unsynchronised"
    ZERO_TIMESTAMP = "zero_timestamp"
    KOD_RATE = "kod_rate"
    KOD_DENY = "kod_deny"
    KOD_RSTR = "kod_rstr"
    KOD_OTHER = "kod_other"


class FilterReason(StrEnum):
    """A sample the per-source filter keeps out (``timesyncd.filter``)."""

    DELAY_SPIKE = "delay_spike"


class TrustReason(StrEnum):
    """A host-trusted source refused by the trust rule (``timesyncd.trust``)."""

    OUTSIDE_AUTHENTICATED_BOUNDS = "outside_authenticated_bounds"


class SourceReason(StrEnum):
    """Counted per source or for the whole guest by the controller and its sources."""

    NO_REPLY = "no_reply"
    UNKNOWN_SOURCE = "unknown_source"
    CLOCK_STEPPED = "clock_stepped"  # measured across a step: meaningless
    NO_MAJORITY = "no_majority"
    STEP_UNCONFIRMED = "step_unconfirmed"
    FALSETICKER = "falseticker"  # a source's note, shown as 'x'


class NtsReason(StrEnum):
    """NTS requests and replies (``timesyncd.nts``, ``guest_client.nts_*``)."""

    NO_COOKIES = "nts_no_cookies"
    MISSING_UID = "nts_missing_uid"
    UID_MISMATCH = "nts_uid_mismatch"
    NAK = "nts_nak"
    BAD_AUTH = "nts_bad_auth"
    UNSOLICITED = "nts_unsolicited"
    NOT_READY = "nts_not_ready"
    DISABLED = "nts_disabled"
    KE_ERROR = "nts_ke_error"
    KE_CONNECT_FAILED = "nts_ke_connect_failed"
    KE_ENDPOINT_NOT_OFFERED = "nts_ke_endpoint_not_offered"
    NTP_SERVER_NOT_ALLOWLISTED = "ntp_server_not_allowlisted"
    KE_SERVER_MISCONFIGURED = "ke_server_misconfigured"
    KE_PATH_SUSPECT = "ke_path_suspect"
    DISCARDED_ON_RESTORE = "discarded_on_restore"  # keys and cookies dropped (restore, clone)


class LinkReason(StrEnum):
    """The guest's relay link (``guest_client.relay_link``): counters and request failures."""

    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection_lost"
    LOST_IN_FLIGHT = "lost_in_flight"
    RELAY_STALLED = "relay_stalled"
    RELAY_NOT_CONNECTED = "relay_not_connected"
    SEND_NOT_CONNECTED = "send_not_connected"
    SEND_BUSY = "send_busy"
    HELLO_TIMEOUT = "hello_timeout"
    HELLO_CONNECTION_LOST = "hello_connection_lost"
    UNSOLICITED_FRAME = "unsolicited_frame"
    UNSOLICITED_REPLY = "unsolicited_reply"
    ERROR_UNKNOWN_ID = "error_unknown_id"
    RESET = "reset"  # dropped on purpose after a restore or clone (sessions are shared)


class DaemonReason(StrEnum):
    """The guest daemon's own errors (``daemon_errors`` in status) and what it reports to the
    controller for a source."""

    RESTORE_FAILED = "restore_failed"
    FREQ_FILE_WRITE_FAILED = "freq_file_write_failed"
    FREQ_FILE_OUT_OF_RANGE = "freq_file_out_of_range"  # a base the next start would refuse
    TIMER_NOT_ADVANCED = "timer_not_advanced"
    BEFORE_TIME_FLOOR = "before_time_floor"
    SEND_FAILED = "send_failed"
    UNKNOWN_SOURCE = "unknown_source"
    CLOCKBOUND_ERROR = "clockbound_error"
    HEALTH_ENCODE_FAILED = "encode_failed"
    HEALTH_NOT_CONNECTED = "not_connected"


class LocalServiceReason(StrEnum):
    """The guest's local sockets and writers: status/control answers, ``--forward-ntp`` and
    ClockBound counters."""

    BAD_REQUEST = "bad_request"
    OVERSIZED = "oversized"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    EVICTED = "evicted"
    DISCONNECTED = "disconnected"
    FORBIDDEN = "forbidden"
    NO_PEER_CREDENTIALS = "no_peer_credentials"
    FORWARDED = "forwarded"
    ANSWERED = "answered"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    RELAY_DOWN = "relay_down"
    NOT_CLIENT_REQUEST = "not_client_request"
    WRITES = "writes"
    FILE_TRUNCATED = "file_truncated"
    FOREIGN_WRITER = "foreign_writer"


class RelayReason(StrEnum):
    """The relay's errors (``timesync_relay_errors_total{reason}``) and KE proxy stream ends."""

    PER_GUEST_LIMIT = "per_guest_limit"
    RATE_LIMITED = "rate_limited"
    UNEXPECTED_FRAME = "unexpected_frame"
    NO_HELLO = "no_hello"
    BAD_HELLO_VERSION = "bad_hello_version"
    UNKNOWN_UPSTREAM = "unknown_upstream"
    BAD_PACKET = "bad_packet"
    BUSY = "busy"
    FD_LIMIT = "fd_limit"
    SLOW_READER = "slow_reader"
    CONNECTION_LOST = "connection_lost"
    UNSENDABLE_FRAME = "unsendable_frame"
    SEND_FAILED = "send_failed"
    TIMEOUT = "timeout"
    CLOSED_BY_GUEST = "closed_by_guest"
    CONNECT_FAILED = "connect_failed"
    ENDPOINT_ERROR = "endpoint_error"
    GUEST_BUDGET_EXCEEDED = "guest_budget_exceeded"
    GUEST_DISCONNECTED = "guest_disconnected"
    OPENED = "opened"
    STREAM_TIMEOUT = "stream_timeout"
    STREAM_TOO_LONG = "stream_too_long"
    TOO_MANY_STREAMS = "too_many_streams"
    UNKNOWN_ENDPOINT = "unknown_endpoint"
    UNKNOWN_STREAM = "unknown_stream"


AREAS: tuple[type[StrEnum], ...] = (
    StateReason, ExchangeReason, FilterReason, TrustReason, SourceReason, NtsReason,
    LinkReason, DaemonReason, LocalServiceReason, RelayReason)

#: Families of names built at run time: the prefix, then a name from a closed set chosen by
#: the code (a packet, framing, HELLO, health or KE error; an errno name; a frame type).
FAMILIES = ("malformed:", "malformed_reply:", "connect_", "hello_", "framing_", "reply_",
            "error_", "ignored_frame_", "health_", "ke_", "nts_ke_", "failed_", "socket_")
_SUFFIX = re.compile(r"^[a-z0-9_]+$")


def all_reasons() -> frozenset[str]:
    """Every registered name (without the families)."""
    return frozenset(str(m) for area in AREAS for m in area)


def is_reason(name: str) -> bool:
    """Whether ``name`` is a registered reason or a member of a registered family."""
    if name in all_reasons():
        return True
    return any(name.startswith(p) and _SUFFIX.match(name[len(p):]) for p in FAMILIES)
