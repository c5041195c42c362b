"""Relay counters: plain integers bumped on the hot path, snapshotted for status and tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RelayStats:
    connections_open: int = 0
    connections_accepted: int = 0
    #: refused at accept because ``max_connections`` were open
    connections_refused: int = 0
    #: frames by ``FrameType`` name, each direction
    frames_in: Counter[str] = field(default_factory=Counter)
    frames_out: Counter[str] = field(default_factory=Counter)
    #: guest-caused and transport errors by stable reason (``rate_limited``, ``oversized``, ...)
    errors: Counter[str] = field(default_factory=Counter)
    upstream_requests: int = 0
    upstream_replies: int = 0
    upstream_errors: int = 0
    upstream_timeouts: int = 0
    #: datagrams from an upstream that matched no request (late, duplicate or forged)
    upstream_unsolicited: int = 0
    upstream_late: int = 0  # replies to requests that timed out or were cancelled
    #: upstream sockets replaced after an error, and readers re-registered after a stall
    upstream_reopens: int = 0
    upstream_reader_repairs: int = 0
    #: NTP requests dropped unforwarded: queued longer than their guest waits (relay stall)
    stale_requests: int = 0
    #: listen-socket accept failures by errno name (EMFILE, ENFILE, ENOBUFS, ...)
    accept_errors: Counter[str] = field(default_factory=Counter)
    #: requests answered from the host clock (no upstreams configured)
    local_replies: int = 0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return {
            "connections_open": self.connections_open,
            "connections_accepted": self.connections_accepted,
            "connections_refused": self.connections_refused,
            "frames_in": dict(self.frames_in),
            "frames_out": dict(self.frames_out),
            "errors": dict(self.errors),
            "upstream_requests": self.upstream_requests,
            "upstream_replies": self.upstream_replies,
            "upstream_errors": self.upstream_errors,
            "upstream_timeouts": self.upstream_timeouts,
            "upstream_unsolicited": self.upstream_unsolicited,
            "upstream_late": self.upstream_late,
            "upstream_reopens": self.upstream_reopens,
            "upstream_reader_repairs": self.upstream_reader_repairs,
            "stale_requests": self.stale_requests,
            "accept_errors": dict(self.accept_errors),
            "local_replies": self.local_replies,
        }
