"""NTPv4 packet codec (RFC 5905 header, RFC 7822 extension fields, RFC 8915 NTS layout).

Decoding never trusts lengths: every malformed input raises :class:`PacketError` with a
short machine-readable ``reason`` that callers count.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER_LEN = 48
_HEADER = struct.Struct("!BBbbII4sQQQQ")
_EF_HEADER = struct.Struct("!HH")
#: Largest packet we accept or produce; leaves room for NTS cookies and authenticators.
MAX_PACKET_LEN = 2048


class Mode(IntEnum):
    SYMMETRIC_ACTIVE = 1
    SYMMETRIC_PASSIVE = 2
    CLIENT = 3
    SERVER = 4
    BROADCAST = 5


class Leap(IntEnum):
    NONE = 0
    INSERT = 1  # last minute of the day has 61 s
    DELETE = 2  # last minute of the day has 59 s
    UNSYNCHRONISED = 3


class ExtType(IntEnum):
    """Extension field types used by NTS (RFC 8915 section 5.7)."""

    UNIQUE_IDENTIFIER = 0x0104
    NTS_COOKIE = 0x0204
    NTS_COOKIE_PLACEHOLDER = 0x0304
    NTS_AUTHENTICATOR = 0x0404


class PacketError(ValueError):
    """A packet that cannot be decoded; ``reason`` is a stable counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ExtensionField:
    type: int
    body: bytes

    def encode(self, min_len: int = 16) -> bytes:
        """Encode with the 4-byte header, zero-padded to a multiple of 4 and ``min_len``."""
        length = _EF_HEADER.size + len(self.body)
        padded = max(min_len, (length + 3) & ~3)
        if padded > 0xFFFF:
            raise ValueError("extension field too long")
        return _EF_HEADER.pack(self.type, padded) + self.body + b"\0" * (padded - length)


@dataclass(frozen=True, slots=True)
class NtpPacket:
    """An NTP packet. Timestamps are raw 64-bit NTP values; root delay/dispersion raw 16.16."""

    leap: int = Leap.NONE
    version: int = 4
    mode: int = Mode.CLIENT
    stratum: int = 0
    poll: int = 0
    precision: int = 0
    root_delay: int = 0
    root_dispersion: int = 0
    reference_id: bytes = b"\0\0\0\0"
    reference_ts: int = 0
    origin_ts: int = 0
    receive_ts: int = 0
    transmit_ts: int = 0
    extensions: tuple[ExtensionField, ...] = field(default_factory=tuple)
    #: legacy symmetric-key MAC (key id + digest), kept opaque
    mac: bytes = b""

    def encode(self) -> bytes:
        if not (0 <= self.leap <= 3 and 0 <= self.version <= 7 and 0 <= self.mode <= 7):
            raise ValueError("leap, version or mode out of range")
        if len(self.reference_id) != 4:  # struct would silently pad or truncate it
            raise ValueError(f"reference_id must be 4 bytes, got {len(self.reference_id)}")
        first = (self.leap << 6) | (self.version << 3) | self.mode
        try:
            head = _HEADER.pack(
                first, self.stratum, self.poll, self.precision, self.root_delay,
                self.root_dispersion, self.reference_id, self.reference_ts, self.origin_ts,
                self.receive_ts, self.transmit_ts,
            )
        except struct.error as exc:
            raise ValueError(f"NTP header field out of range: {exc}") from exc
        efs = b""
        for i, ef in enumerate(self.extensions):
            last = i == len(self.extensions) - 1
            efs += ef.encode(min_len=28 if last and not self.mac else 16)
        return head + efs + self.mac

    def find(self, ef_type: int) -> list[ExtensionField]:
        return [ef for ef in self.extensions if ef.type == ef_type]


def decode(data: bytes) -> NtpPacket:
    """Decode an NTP packet; raise :class:`PacketError` on anything malformed."""
    if len(data) < HEADER_LEN:
        raise PacketError("truncated", f"{len(data)} bytes, need {HEADER_LEN}")
    if len(data) > MAX_PACKET_LEN:
        raise PacketError("oversized", f"{len(data)} bytes, limit {MAX_PACKET_LEN}")
    if len(data) % 4:
        raise PacketError("misaligned", f"length {len(data)} is not a multiple of 4")
    (first, stratum, poll, precision, root_delay, root_disp, ref_id,
     ref_ts, org_ts, rec_ts, xmt_ts) = _HEADER.unpack_from(data)
    version = (first >> 3) & 7
    if version not in (1, 2, 3, 4):
        raise PacketError("bad_version", f"version {version}")
    extensions, mac = _decode_tail(data[HEADER_LEN:]) if version == 4 else ((), data[HEADER_LEN:])
    return NtpPacket(
        leap=first >> 6, version=version, mode=first & 7, stratum=stratum, poll=poll,
        precision=precision, root_delay=root_delay, root_dispersion=root_disp,
        reference_id=ref_id, reference_ts=ref_ts, origin_ts=org_ts, receive_ts=rec_ts,
        transmit_ts=xmt_ts, extensions=extensions, mac=mac,
    )


def _decode_tail(tail: bytes) -> tuple[tuple[ExtensionField, ...], bytes]:
    """Split what follows the header into extension fields and an optional legacy MAC."""
    efs: list[ExtensionField] = []
    pos = 0
    while len(tail) - pos > 24:  # more than a MAC can be: must be an extension field
        ef_type, length = _EF_HEADER.unpack_from(tail, pos)
        if length < 16 or length % 4:
            raise PacketError("bad_extension", f"field length {length} at offset {pos}")
        if pos + length > len(tail):
            raise PacketError("truncated_extension", f"field of {length} bytes at {pos}")
        efs.append(ExtensionField(ef_type, bytes(tail[pos + 4 : pos + length])))
        pos += length
    rest = bytes(tail[pos:])
    if rest and len(rest) not in (20, 24):  # key id + MD5 or SHA-1 digest
        raise PacketError("bad_mac", f"{len(rest)} trailing bytes")
    return tuple(efs), rest


def encode_authenticator_body(nonce: bytes, ciphertext: bytes) -> bytes:
    """Body of the NTS Authenticator and Encrypted Extension Fields field (RFC 8915 5.6)."""

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("!HH", len(nonce), len(ciphertext)) + pad(nonce) + pad(ciphertext)


def decode_authenticator_body(body: bytes) -> tuple[bytes, bytes]:
    """Return ``(nonce, ciphertext)`` from an NTS Authenticator body; PacketError if malformed."""
    if len(body) < 4:
        raise PacketError("bad_authenticator", "body shorter than its length fields")
    n_len, c_len = struct.unpack_from("!HH", body)
    n_end = 4 + n_len + (-n_len % 4)
    c_end = n_end + c_len
    if c_end > len(body):
        raise PacketError("bad_authenticator", "lengths exceed the field")
    return bytes(body[4 : 4 + n_len]), bytes(body[n_end:c_end])
