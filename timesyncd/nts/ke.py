"""NTS-KE record codec, request building and response parsing (RFC 8915 section 4).

Records are ``critical bit | type (15 bits), body length (16 bits), body``. The server's answer
is untrusted input even over TLS (a buggy or hostile server), so parsing is strict and every
problem raises :class:`KeError` with a stable ``reason`` for counters.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum

_RECORD_HEADER = struct.Struct("!HH")
CRITICAL = 0x8000

#: Next protocol id for NTPv4 (RFC 8915 section 7.7).
NEXT_PROTOCOL_NTPV4 = 0
#: AEAD_AES_SIV_CMAC_256 (RFC 5297), the one algorithm every NTS implementation supports.
AEAD_AES_SIV_CMAC_256 = 15
#: Default NTP port when the server sends no Port Negotiation record.
DEFAULT_NTP_PORT = 123
#: Bounds on what we accept from a server: enough for chrony/NTPsec, small enough to not hoard.
MAX_RESPONSE_LEN = 65536
MAX_COOKIES = 8
MAX_COOKIE_LEN = 1024


class RecordType(IntEnum):
    END_OF_MESSAGE = 0
    NEXT_PROTOCOL = 1
    ERROR = 2
    WARNING = 3
    AEAD_ALGORITHM = 4
    NEW_COOKIE = 5
    NTPV4_SERVER = 6
    NTPV4_PORT = 7


#: Warning record codes we understand (RFC 8915 section 7.6: the registry has none yet). A
#: warning we do not understand aborts the exchange, as an Error record does, rather than being
#: silently ignored.
KNOWN_WARNINGS: frozenset[int] = frozenset()


class KeErrorCode(IntEnum):
    """Error record codes (RFC 8915 section 4.1.3)."""

    UNRECOGNIZED_CRITICAL_RECORD = 0
    BAD_REQUEST = 1
    INTERNAL_SERVER_ERROR = 2


class KeError(ValueError):
    """NTS-KE failed; ``reason`` is a stable counter key such as ``"missing_aead"``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Record:
    type: int
    body: bytes = b""
    critical: bool = False

    def encode(self) -> bytes:
        if not 0 <= self.type < CRITICAL:
            raise ValueError(f"record type {self.type} out of range")
        if len(self.body) > 0xFFFF:
            raise ValueError("record body too long")
        first = self.type | (CRITICAL if self.critical else 0)
        return _RECORD_HEADER.pack(first, len(self.body)) + self.body


def decode_records(data: bytes) -> tuple[list[Record], int]:
    """Decode whole records from the front of ``data``; return them and the bytes consumed.

    A trailing partial record is left unconsumed (the stream may deliver the rest later).
    """
    records: list[Record] = []
    pos = 0
    while len(data) - pos >= _RECORD_HEADER.size:
        first, length = _RECORD_HEADER.unpack_from(data, pos)
        end = pos + _RECORD_HEADER.size + length
        if end > len(data):
            break
        records.append(
            Record(first & ~CRITICAL, bytes(data[pos + _RECORD_HEADER.size : end]),
                   bool(first & CRITICAL))
        )
        pos = end
    return records, pos


def _u16s(body: bytes) -> tuple[int, ...]:
    return struct.unpack(f"!{len(body) // 2}H", body)


def build_request(
    aead_ids: tuple[int, ...] = (AEAD_AES_SIV_CMAC_256,),
    *,
    server: str | None = None,
    port: int | None = None,
) -> bytes:
    """Client request: NTPv4 next protocol, our AEAD preferences, optional hints, End of Message."""
    if not aead_ids:
        raise ValueError("at least one AEAD algorithm is required")
    records = [
        Record(RecordType.NEXT_PROTOCOL, struct.pack("!H", NEXT_PROTOCOL_NTPV4), critical=True),
        Record(RecordType.AEAD_ALGORITHM, struct.pack(f"!{len(aead_ids)}H", *aead_ids)),
    ]
    if server is not None:
        records.append(Record(RecordType.NTPV4_SERVER, server.encode("ascii")))
    if port is not None:
        records.append(Record(RecordType.NTPV4_PORT, struct.pack("!H", port)))
    records.append(Record(RecordType.END_OF_MESSAGE, critical=True))
    return b"".join(r.encode() for r in records)


@dataclass(frozen=True)
class KeResponse:
    """What the server agreed to. ``server``/``port`` are None when not negotiated: use the
    NTS-KE host and :data:`DEFAULT_NTP_PORT`."""

    next_protocol: int
    aead_id: int
    cookies: tuple[bytes, ...] = field(repr=False)  # secrets: never in logs or tracebacks
    server: str | None = None
    port: int | None = None
    warnings: tuple[int, ...] = ()


class ResponseParser:
    """Incremental response parser: feed stream bytes until :meth:`feed` returns the response."""

    def __init__(self, offered_aeads: tuple[int, ...] = (AEAD_AES_SIV_CMAC_256,)) -> None:
        self._offered = offered_aeads
        self._buffer = b""
        self._total = 0
        self._records: list[Record] = []
        self.response: KeResponse | None = None

    def feed(self, data: bytes) -> KeResponse | None:
        if self.response is not None:
            if data:
                raise KeError("trailing_data", "bytes after End of Message")
            return self.response
        self._total += len(data)
        if self._total > MAX_RESPONSE_LEN:
            raise KeError("response_too_long", f"over {MAX_RESPONSE_LEN} bytes")
        self._buffer += data
        records, used = decode_records(self._buffer)
        self._buffer = self._buffer[used:]
        for i, record in enumerate(records):
            self._records.append(record)
            if record.type == RecordType.END_OF_MESSAGE:
                if i != len(records) - 1 or self._buffer:
                    raise KeError("trailing_data", "records after End of Message")
                self.response = _interpret(self._records, self._offered)
        return self.response

    def eof(self) -> KeResponse:
        """The stream ended: return the response, or raise if it was incomplete."""
        if self.response is None:
            raise KeError("incomplete", "stream ended before End of Message")
        return self.response


def parse_response(
    data: bytes, offered_aeads: tuple[int, ...] = (AEAD_AES_SIV_CMAC_256,)
) -> KeResponse:
    """Parse one complete server response."""
    parser = ResponseParser(offered_aeads)
    parser.feed(data)
    return parser.eof()


def _interpret(records: list[Record], offered: tuple[int, ...]) -> KeResponse:
    protocols: tuple[int, ...] | None = None
    aeads: tuple[int, ...] | None = None
    cookies: list[bytes] = []
    warnings: list[int] = []
    server: str | None = None
    port: int | None = None
    for r in records:
        t, body = r.type, r.body
        if t == RecordType.END_OF_MESSAGE:
            if body:
                raise KeError("bad_record", "End of Message with a body")
        elif t == RecordType.ERROR:
            if len(body) != 2:
                raise KeError("bad_record", "Error record body is not 2 bytes")
            raise KeError("server_error", _error_name(_u16s(body)[0]))
        elif t == RecordType.WARNING:
            if len(body) != 2:
                raise KeError("bad_record", "Warning record body is not 2 bytes")
            code = _u16s(body)[0]
            if code not in KNOWN_WARNINGS:  # none is registered: we cannot know what it means
                raise KeError("unknown_warning", f"Warning record code {code}")
            warnings.append(code)
        elif t == RecordType.NEXT_PROTOCOL:
            if protocols is not None or len(body) % 2:
                raise KeError("bad_record", "duplicate or odd-length Next Protocol record")
            protocols = _u16s(body)
        elif t == RecordType.AEAD_ALGORITHM:
            if aeads is not None or len(body) % 2:
                raise KeError("bad_record", "duplicate or odd-length AEAD record")
            aeads = _u16s(body)
        elif t == RecordType.NEW_COOKIE:
            if not body or len(body) > MAX_COOKIE_LEN:
                raise KeError("bad_cookie", f"cookie of {len(body)} bytes")
            if len(cookies) < MAX_COOKIES:
                cookies.append(body)
        elif t == RecordType.NTPV4_SERVER:
            server = _server_name(body, server)
        elif t == RecordType.NTPV4_PORT:
            if len(body) != 2 or port is not None:
                raise KeError("bad_record", "bad or duplicate Port record")
            port = _u16s(body)[0]
        elif r.critical:
            raise KeError("unrecognized_critical", f"record type {t}")
        # unknown non-critical records are ignored, as RFC 8915 requires
    if protocols is None:
        raise KeError("missing_next_protocol")
    if protocols != (NEXT_PROTOCOL_NTPV4,):
        raise KeError("bad_next_protocol", f"server chose {protocols}, we asked for NTPv4 only")
    if aeads is None:
        raise KeError("missing_aead")
    if len(aeads) != 1 or aeads[0] not in offered:
        raise KeError("bad_aead", f"server chose {aeads}, we offered {offered}")
    if not cookies:
        raise KeError("no_cookies")
    return KeResponse(NEXT_PROTOCOL_NTPV4, aeads[0], tuple(cookies), server, port,
                      tuple(warnings))


def _server_name(body: bytes, previous: str | None) -> str:
    """The Server record as RFC 8915 section 4.1.7 allows it: an IPv4 address in dotted
    decimal, an IPv6 address (no zone) or a fully qualified domain name in A-label form."""
    if previous is not None:
        raise KeError("bad_record", "duplicate Server record")
    try:
        name = body.decode("ascii")
    except UnicodeDecodeError:
        raise KeError("bad_record", "Server record is not ASCII") from None
    if not valid_server_name(name):
        raise KeError("bad_server", f"Server record {name[:80]!r} is not an IPv4 address, "
                      "IPv6 address or domain name")
    return name


def valid_server_name(name: str) -> bool:
    """True for an IPv4 address, an IPv6 address without zone, or an LDH domain name."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    if ":" in name:
        if "%" in name:
            return False
        try:
            return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
        except ValueError:
            return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if all(label.isdigit() for label in labels):  # looks numeric: must be a real IPv4 address
        try:
            ipaddress.IPv4Address(name.rstrip("."))
        except ValueError:
            return False
        return not name.endswith(".")
    return all(_ldh_label(label) for label in labels)


def _ldh_label(label: str) -> bool:
    return (0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
            and all(c.isalnum() or c == "-" for c in label))


def _error_name(code: int) -> str:
    try:
        return KeErrorCode(code).name.lower()
    except ValueError:
        return f"code_{code}"
