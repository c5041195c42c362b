"""Relay framing: how NTP packets, NTS-KE byte streams and health reports travel over one
vsock or Unix stream between guest and relay. Sans-IO: bytes in, frames out.

Wire format, all big-endian::

    version:u8 (=1) | type:u8 | length:u16 (payload bytes) | request_id:u32 | payload

Request ids let one connection carry concurrent requests to several upstreams; replies
and errors echo the id of the request they answer.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from timesyncd.text import clean_text

VERSION = 1
HEADER = struct.Struct("!BBHI")
#: Hard payload limit: admits an NTS-sized NTP packet (<= 2048 B) with room to spare.
MAX_PAYLOAD = 4096
_NTP_REQUEST = struct.Struct("!B")
_NTP_REPLY = struct.Struct("!II")
_ERROR = struct.Struct("!H")
_STREAM_OPEN = struct.Struct("!BB")


class FrameType(IntEnum):
    HELLO = 1  # JSON both ways: guest announces itself, relay lists its upstreams
    NTP_REQUEST = 2  # upstream index:u8 + NTP packet
    NTP_REPLY = 3  # residence in/out:u32 ns + NTP packet, unchanged from upstream
    ERROR = 4  # code:u16 + UTF-8 message, echoing the failed request's id
    HEALTH = 5  # JSON status report from the guest (observability)
    STREAM_OPEN = 6  # guest: kind:u8 + endpoint index:u8; relay: empty payload = connected
    STREAM_DATA = 7  # opaque bytes of the stream named by request_id, either direction
    STREAM_CLOSE = 8  # either side: stream ended (UTF-8 reason, empty for a clean end)


class ErrorCode(IntEnum):
    UNKNOWN_UPSTREAM = 1
    UPSTREAM_TIMEOUT = 2
    RATE_LIMITED = 3
    BAD_FRAME = 4
    UPSTREAM_ERROR = 5
    BUSY = 6
    UNKNOWN_ENDPOINT = 7  # STREAM_OPEN named no allowlisted stream endpoint
    STREAM_FAILED = 8  # connecting to or talking with the stream endpoint failed


class FramingError(ValueError):
    """Malformed framing from the peer; ``reason`` is a stable counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    request_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise FramingError("oversized", f"payload {len(self.payload)} > {MAX_PAYLOAD}")
        try:
            head = HEADER.pack(VERSION, self.type, len(self.payload), self.request_id)
        except struct.error as exc:
            raise FramingError("bad_field", f"type or request id out of range: {exc}") from exc
        return head + self.payload


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            version, ftype, length, rid = HEADER.unpack_from(self._buf)
            if version != VERSION:
                raise FramingError("bad_version", f"frame version {version}, expected {VERSION}")
            if ftype not in FrameType._value2member_map_:
                raise FramingError("bad_type", f"unknown frame type {ftype}")
            if length > MAX_PAYLOAD:
                raise FramingError("oversized", f"payload {length} > {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(ftype, rid, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buf)


# --- payload helpers -----------------------------------------------------------------


def ntp_request(request_id: int, upstream: int, packet: bytes) -> Frame:
    if not 0 <= upstream <= 0xFF:
        raise FramingError("bad_field", f"upstream index {upstream} does not fit a byte")
    return Frame(FrameType.NTP_REQUEST, request_id, _NTP_REQUEST.pack(upstream) + packet)


def parse_ntp_request(frame: Frame) -> tuple[int, bytes]:
    """Return ``(upstream index, NTP packet)``."""
    if len(frame.payload) < _NTP_REQUEST.size:
        raise FramingError("bad_payload", "NTP request without upstream index")
    return frame.payload[0], frame.payload[1:]


def ntp_reply(request_id: int, packet: bytes, residence_in_ns: int, residence_out_ns: int) -> Frame:
    """A reply with the relay's own residence time in each direction (transparent-clock style)."""
    clamp = 0xFFFF_FFFF
    r_in = min(max(residence_in_ns, 0), clamp)
    r_out = min(max(residence_out_ns, 0), clamp)
    return Frame(FrameType.NTP_REPLY, request_id, _NTP_REPLY.pack(r_in, r_out) + packet)


def parse_ntp_reply(frame: Frame) -> tuple[bytes, int, int]:
    """Return ``(NTP packet, residence_in_ns, residence_out_ns)``."""
    if len(frame.payload) < _NTP_REPLY.size:
        raise FramingError("bad_payload", "NTP reply without residence times")
    r_in, r_out = _NTP_REPLY.unpack_from(frame.payload)
    return frame.payload[_NTP_REPLY.size :], r_in, r_out


def error(request_id: int, code: ErrorCode, message: str) -> Frame:
    body = message.encode("utf-8", "replace")[: MAX_PAYLOAD - _ERROR.size]
    return Frame(FrameType.ERROR, request_id, _ERROR.pack(code) + body)


def parse_error(frame: Frame) -> tuple[int, str]:
    if len(frame.payload) < _ERROR.size:
        raise FramingError("bad_payload", "error frame without code")
    (code,) = _ERROR.unpack_from(frame.payload)
    return code, frame.payload[_ERROR.size :].decode("utf-8", "replace")


def json_frame(ftype: FrameType, request_id: int, obj: Any) -> Frame:
    return Frame(ftype, request_id, json.dumps(obj, separators=(",", ":")).encode())


# --- HELLO: the one codec both sides use ------------------------------------------------------
#
# The guest opens with {"version", "name"[, "request_timeout_s"]}; the relay answers with
# {"version", "upstreams": [{"index", "name"}...][, "nts_ke": [...]]}. ``VERSION`` above is the
# one protocol version: frames and HELLO carry the same number.

#: the longest per-request deadline a guest may announce (seconds)
MAX_REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class GuestHello:
    """What a guest announces: its name as sent (the relay cleans it for display) and its
    per-request deadline, None when absent or not a number in (0, 600] s."""

    name: object
    request_timeout_s: float | None


@dataclass(frozen=True, slots=True)
class RelayHello:
    """The relay's answer: upstreams as (index, cleaned name), and the whole object (e.g. its
    ``nts_ke`` endpoint list)."""

    upstreams: list[tuple[int, str]]
    info: dict[str, Any]


def guest_hello(name: str, request_timeout_s: float | None = None) -> Frame:
    """The guest's HELLO; with ``request_timeout_s`` the relay drops requests still queued
    past it (counted ``stale``) instead of forwarding answers nobody waits for."""
    hello: dict[str, object] = {"version": VERSION, "name": name}
    if request_timeout_s is not None:
        hello["request_timeout_s"] = request_timeout_s
    return json_frame(FrameType.HELLO, 0, hello)


def parse_guest_hello(frame: Frame) -> GuestHello:
    """Raises ``FramingError`` ``bad_payload`` (not JSON) or ``bad_hello_version``."""
    obj = parse_json(frame)
    version = obj.get("version") if isinstance(obj, dict) else None
    if version != VERSION:
        raise FramingError("bad_hello_version",
                           f"unsupported protocol version {version!r}; relay speaks {VERSION}")
    timeout = obj.get("request_timeout_s")
    if not (isinstance(timeout, int | float) and not isinstance(timeout, bool)
            and 0 < timeout <= MAX_REQUEST_TIMEOUT_S):
        timeout = None
    return GuestHello(obj.get("name"), timeout)


def relay_hello(upstreams: list[str], nts_ke: list[str]) -> Frame:
    """The relay's HELLO answer: its upstreams (and NTS-KE endpoints) by index. Raises
    ``ValueError`` naming the settings when the list does not fit one frame."""
    hello: dict[str, object] = {
        "version": VERSION, "upstreams": [{"index": i, "name": n} for i, n in enumerate(upstreams)]}
    if nts_ke:
        hello["nts_ke"] = [{"index": i, "name": n} for i, n in enumerate(nts_ke)]
    frame = json_frame(FrameType.HELLO, 0, hello)
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(
            f"upstreams, nts_ke_servers: the HELLO listing them is {len(frame.payload)} bytes, "
            f"over the {MAX_PAYLOAD}-byte frame limit; list fewer servers or shorter names")
    return frame


def parse_relay_hello(frame: Frame) -> RelayHello:
    """The relay's upstream list; raises ``FramingError`` ``bad_hello`` (or ``bad_payload``)
    for anything malformed: the peer's fault, never a crash. Names are host text, cleaned:
    they become part of source names in status, logs and metric labels."""
    obj = parse_json(frame)
    if not isinstance(obj, dict) or obj.get("version") != VERSION:
        raise FramingError("bad_hello", f"unsupported HELLO {clean_text(str(obj), 100)}")
    raw = obj.get("upstreams")
    if not isinstance(raw, list):
        raise FramingError("bad_hello", "HELLO without an upstream list")
    upstreams = []
    for item in raw:
        if not (isinstance(item, dict) and isinstance(item.get("index"), int)
                and isinstance(item.get("name"), str) and 0 <= item["index"] <= 255):
            raise FramingError("bad_hello", f"bad upstream entry {clean_text(str(item), 100)}")
        upstreams.append((item["index"], clean_text(item["name"], 128)))
    return RelayHello(upstreams, obj)


def parse_json(frame: Frame) -> Any:
    try:
        return json.loads(frame.payload)
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, or nesting deep enough to blow
        # the stack (a 4 KiB payload of '[' does): both are the peer's fault, not a crash.
        name = FrameType(frame.type).name if frame.type in FrameType._value2member_map_ else "?"
        raise FramingError("bad_payload", f"invalid JSON in {name} frame") from exc


# --- byte streams (NTS-KE pass-through) ------------------------------------------------------
#
# The guest opens a stream with STREAM_OPEN(stream id, kind, endpoint index) naming one of the
# relay's allowlisted stream endpoints (HELLO lists them, e.g. under "nts_ke"). The relay
# answers STREAM_OPEN(id, empty) once connected, or ERROR(id)/STREAM_CLOSE(id). Then
# STREAM_DATA frames carry opaque bytes both ways; STREAM_CLOSE from either side ends the
# stream. Stream ids share the request id space of the connection, so an ERROR is unambiguous.


class StreamKind(IntEnum):
    NTS_KE = 1  # TLS to an allowlisted NTS-KE server; the relay sees only ciphertext


def stream_open(stream_id: int, endpoint: int, kind: StreamKind = StreamKind.NTS_KE) -> Frame:
    if not 0 <= endpoint <= 0xFF:
        raise FramingError("bad_field", f"endpoint index {endpoint} does not fit a byte")
    return Frame(FrameType.STREAM_OPEN, stream_id, _STREAM_OPEN.pack(kind, endpoint))


def parse_stream_open(frame: Frame) -> tuple[int, int]:
    """Return ``(kind, endpoint index)`` of a guest's STREAM_OPEN."""
    if len(frame.payload) != _STREAM_OPEN.size:
        raise FramingError("bad_payload", "STREAM_OPEN payload is not kind:u8 + endpoint:u8")
    kind, endpoint = _STREAM_OPEN.unpack(frame.payload)
    return kind, endpoint


def stream_opened(stream_id: int) -> Frame:
    """The relay's acknowledgement: the endpoint accepted the connection."""
    return Frame(FrameType.STREAM_OPEN, stream_id, b"")


def stream_data(stream_id: int, data: bytes) -> list[Frame]:
    """``data`` cut into frames of at most :data:`MAX_PAYLOAD` bytes (none for empty data)."""
    return [Frame(FrameType.STREAM_DATA, stream_id, data[i : i + MAX_PAYLOAD])
            for i in range(0, len(data), MAX_PAYLOAD)]


def stream_close(stream_id: int, reason: str = "") -> Frame:
    return Frame(FrameType.STREAM_CLOSE, stream_id,
                 reason.encode("utf-8", "replace")[:MAX_PAYLOAD])


def parse_stream_close(frame: Frame) -> str:
    """The close reason ('' for a clean end of stream)."""
    return frame.payload.decode("utf-8", "replace")
