"""Connected guests and their latest health reports, for metrics and ``timesync status --relay``.

One record per guest connection, created when its HELLO is accepted and dropped when it
disconnects. A guest is identified by what the host can verify (its vsock CID, the Firecracker
socket it came in on, its Unix peer's pid, or its TCP peer), not by the name it announces; the
name is shown beside it. A guest (peer) whose last connection closes is remembered for
``GONE_TTL_S`` (at most ``MAX_GONE`` of them, oldest forgotten first) so a "guest missing"
alert has a series to fire on; nothing else grows with churn.
"""

from __future__ import annotations

import _socket
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from timesyncd.health import HealthError, HealthReport, parse_health
from timesyncd.ratelimit import TokenBucket

#: Reports accepted per connection: sustained rate and burst (a token bucket). The guest's
#: default is one per 10 s; anything faster is counted and ignored, never an error frame.
REPORT_RATE_PER_S = 1.0
REPORT_BURST = 5
#: How long a guest that disconnected stays visible (``timesync_guest_up`` 0), and how many.
GONE_TTL_S = 3600.0
MAX_GONE = 1024
_PEERCRED = struct.Struct("3i")
_SO_PEERCRED: int | None = getattr(socket, "SO_PEERCRED", None)
_AF_VSOCK: int = getattr(socket, "AF_VSOCK", 40)


@dataclass(slots=True)
class GoneGuest:
    """What is kept of a guest after it disconnects: enough for "missing" alerts."""

    guest: str
    name: str
    gone_mono_ns: int


@dataclass(slots=True)
class GuestRecord:
    guest: str  # host-verified identity: "cid:3", "tcp:127.0.0.1:40000", "conn:7"
    name: str  # what the guest announced in HELLO (untrusted; display only)
    connected_at: float  # host Unix seconds
    connected_mono_ns: int
    #: reports accepted (REPORT_RATE_PER_S, REPORT_BURST); made at the first report, as full
    #: as one made at connect would be by then (most churned connections never report)
    bucket: TokenBucket | None = None
    report: HealthReport | None = None
    report_mono_ns: int = 0
    reports: int = 0
    refused_reports: int = 0
    peer: str = ""  # ``guest`` without the ``/N`` a second connection from the same peer gets

    def to_json(self, now_mono_ns: int) -> dict[str, Any]:
        return {
            "guest": self.guest,
            "name": self.name,
            "connected_at": self.connected_at,
            "connected_s": (now_mono_ns - self.connected_mono_ns) / 1e9,
            "reports": self.reports,
            "refused_reports": self.refused_reports,
            "report_age_s": (now_mono_ns - self.report_mono_ns) / 1e9 if self.report else None,
            "report": self.report.to_json() if self.report else None,
        }


class PeerInfo(Protocol):
    """Anything with a transport's ``get_extra_info`` (a transport, a StreamWriter, ...)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class GuestRegistry:
    """Keyed by the relay's connection object (identity), so a reconnect is a new record."""

    def __init__(self, one_guest_sockets: Collection[str] = (),
                 gone_ttl_s: float = GONE_TTL_S, max_gone: int = MAX_GONE) -> None:
        self._guests: dict[object, GuestRecord] = {}
        self._taken: set[str] = set()  # identities in use (O(1) uniqueness on connect)
        self._live: dict[str, int] = {}  # connections held, by peer identity
        self._seq = 0
        self._one_guest_sockets = frozenset(one_guest_sockets)
        self._gone: OrderedDict[str, GoneGuest] = OrderedDict()  # oldest first
        self._gone_ttl_ns = int(gone_ttl_s * 1e9)
        self._max_gone = max_gone

    def __len__(self) -> int:
        return len(self._guests)

    def connect(self, conn: object, writer: PeerInfo, name: str,
                now_mono_ns: int | None = None, peer: str | None = None) -> GuestRecord:
        """``peer``: the identity :func:`peer_of` already found for this connection ("" when
        anonymous), so the transport is not asked twice; None asks ``writer``."""
        seq = self._seq = self._seq + 1
        if peer is None:
            peer = peer_of(writer, self._one_guest_sockets)[1]
        if not peer:
            peer = f"conn:{seq}"
        # a second connection from the same peer gets the connection number appended (O(1):
        # the number is unique in this process)
        ident = peer if peer not in self._taken else f"{peer}/{seq}"
        mono = now_mono_ns if now_mono_ns is not None else time.monotonic_ns()
        record = GuestRecord(ident, name, time.time(), mono, peer=peer)
        self._guests[conn] = record
        self._taken.add(ident)
        live = self._live
        live[peer] = live.get(peer, 0) + 1
        if self._gone:
            self._gone.pop(peer, None)  # back: no longer missing
        return record

    def disconnect(self, conn: object, now_mono_ns: int | None = None) -> GuestRecord | None:
        record = self._guests.pop(conn, None)
        if record is None:
            return None
        self._taken.discard(record.guest)
        left = self._live.pop(record.peer, 1) - 1
        if left > 0:
            self._live[record.peer] = left
            return record  # the peer is still here on another connection: not missing
        mono = now_mono_ns if now_mono_ns is not None else time.monotonic_ns()
        self._gone.pop(record.peer, None)
        self._gone[record.peer] = GoneGuest(record.peer, record.name, mono)
        while len(self._gone) > self._max_gone:
            self._gone.popitem(last=False)
        return record

    def gone(self, now_mono_ns: int) -> list[GoneGuest]:
        """Guests that left within the TTL (expired ones are forgotten here), oldest first."""
        while self._gone:
            oldest = next(iter(self._gone.values()))
            if now_mono_ns - oldest.gone_mono_ns <= self._gone_ttl_ns:
                break
            self._gone.popitem(last=False)
        return list(self._gone.values())

    def get(self, conn: object) -> GuestRecord | None:
        return self._guests.get(conn)

    def report(self, conn: object, payload: bytes, now_mono_ns: int,
               charge: bool = True) -> GuestRecord:
        """Store a HEALTH payload; raises :class:`HealthError` (reason ``rate_limited``,
        ``no_hello`` or a parse reason) for one that is refused. ``charge=False``: reports
        that piled up while the relay stood still arrive together through no fault of the
        guest, so they do not count against its rate."""
        record = self._guests.get(conn)
        if record is None:
            raise HealthError("no_hello", "HEALTH before HELLO")
        bucket = record.bucket
        if bucket is None:
            bucket = record.bucket = TokenBucket(REPORT_RATE_PER_S, REPORT_BURST,
                                                 record.connected_mono_ns)
        if charge and not bucket.take(now_mono_ns):
            record.refused_reports += 1
            raise HealthError("rate_limited", f"{record.guest} reports too often")
        try:
            report = parse_health(payload)
        except HealthError:
            record.refused_reports += 1
            raise
        record.report = report
        record.report_mono_ns = now_mono_ns
        record.reports += 1
        return record

    def records(self) -> list[GuestRecord]:
        return sorted(self._guests.values(), key=lambda r: r.guest)

    def snapshot(self, now_mono_ns: int | None = None) -> list[dict[str, Any]]:
        now = now_mono_ns if now_mono_ns is not None else time.monotonic_ns()
        return [r.to_json(now) for r in self.records()]


def peer_key(writer: PeerInfo, one_guest_sockets: Collection[str] = ()) -> str | None:
    """Who is connecting, as far as the host can tell before HELLO: the vsock CID, the TCP
    host, or the listening socket when it is one of ``one_guest_sockets`` (a Firecracker
    socket serves one microVM). None for a plain Unix socket: its local clients are not
    told apart."""
    return peer_of(writer, one_guest_sockets)[0]


def display_name(raw: object, limit: int = 64) -> str:
    """The HELLO name as shown in metrics and logs: printable text only (no lone surrogates,
    control or format characters), at most ``limit`` characters; anything else is dropped."""
    if not isinstance(raw, str):
        return ""
    return "".join(ch for ch in raw[: limit * 4] if ch.isprintable()
                   and not 0xD800 <= ord(ch) <= 0xDFFF)[:limit]


def peer_identity(writer: PeerInfo, seq: int, one_guest_sockets: Collection[str] = ()) -> str:
    """What the host knows for sure about the peer, stable across the guest's reconnects
    where the host can tell: a vsock CID (``cid:N``), the Firecracker socket that serves one
    microVM (``fc:PATH``), a Unix peer's process (``unix:pid:N``, from SO_PEERCRED), a TCP
    peer; else the connection number (``conn:N``, per relay process)."""
    return peer_of(writer, one_guest_sockets)[1] or f"conn:{seq}"


def peer_of(writer: PeerInfo, one_guest_sockets: Collection[str] = ()) -> tuple[str | None, str]:
    """:func:`peer_key` and :func:`peer_identity` (``""`` for an anonymous peer) from one look
    at the transport: the relay asks once per connection, at accept, because every question
    (and SO_PEERCRED above all) makes uvloop build a socket object."""
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:  # AF_UNIX: no peer address to go by
        sockname = writer.get_extra_info("sockname")
        if isinstance(sockname, str) and sockname in one_guest_sockets:
            return f"socket:{sockname}", f"fc:{sockname}"
        pid = _peer_pid(writer)
        return None, f"unix:pid:{pid}" if pid else ""
    family = getattr(writer.get_extra_info("socket"), "family", None)
    if family == _AF_VSOCK:
        ident = f"cid:{peer[0]}"
        return ident, ident
    key = f"host:{peer[0]}"
    if family == socket.AF_INET:
        return key, f"tcp:{peer[0]}:{peer[1]}"
    if family == socket.AF_INET6:
        return key, f"tcp:[{peer[0]}]:{peer[1]}"
    return key, ""


def _peer_pid(writer: PeerInfo) -> int | None:
    """The Unix peer's pid as the kernel recorded it at connect (Linux SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None or _SO_PEERCRED is None:
        return None
    try:
        # a bare socket object told its family, so it asks the kernel nothing more, and
        # detached so the descriptor stays the loop's (uvloop's stand-in socket builds a full
        # one, asking the kernel for type and family, on every call: twice the cost)
        raw = _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, sock.fileno())
        try:
            cred = raw.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, 12)
        finally:
            raw.detach()
        pid = _PEERCRED.unpack(cred)[0]
    except (OSError, AttributeError, struct.error, TypeError, ValueError):
        return None
    return pid if pid > 0 else None
