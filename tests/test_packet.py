"""NTP codec: cross-checked with scapy and ntplib both ways, fuzzed with hypothesis."""

from __future__ import annotations

import dataclasses
import struct
from fractions import Fraction

import ntplib
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.ntp import NTPAuthenticator, NTPExtension, NTPExtensions, NTPHeader
from scapy.packet import Raw

from timesyncd.packet import (
    MAX_PACKET_LEN,
    ExtensionField,
    ExtType,
    NtpPacket,
    PacketError,
    decode,
    decode_authenticator_body,
    encode_authenticator_body,
)

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)

headers = st.builds(
    NtpPacket,
    leap=st.integers(0, 3), version=st.just(4), mode=st.integers(0, 7),
    stratum=st.integers(0, 255), poll=st.integers(-128, 127), precision=st.integers(-128, 127),
    root_delay=U32, root_dispersion=U32, reference_id=st.binary(min_size=4, max_size=4),
    reference_ts=U64, origin_ts=U64, receive_ts=U64, transmit_ts=U64,
)


@st.composite
def packets(draw: st.DrawFn) -> NtpPacket:
    """Valid v4 packets whose extension bodies need no padding, so they round-trip exactly."""
    head = draw(headers)
    mac = draw(st.sampled_from([b"", b"m" * 20, b"M" * 24]))
    bodies = draw(st.lists(st.integers(3, 60).map(lambda w: 4 * w), max_size=4))
    if bodies and not mac:
        bodies[-1] = max(bodies[-1], 24)  # RFC 7822: a final field without MAC is >= 28 B
    efs = tuple(
        ExtensionField(draw(st.integers(0, 0xFFFF)), draw(st.binary(min_size=n, max_size=n)))
        for n in bodies
    )
    return dataclasses.replace(head, extensions=efs, mac=mac)


# --- scapy ------------------------------------------------------------------------------


def _scapy_raw(layer: NTPHeader, name: str) -> int:
    return int(layer.getfieldval(name))


@given(headers)
def test_ours_decode_with_scapy(p: NtpPacket) -> None:
    s = NTPHeader(p.encode())
    assert (s.leap, s.version, s.mode, s.stratum) == (p.leap, p.version, p.mode, p.stratum)
    assert (s.poll, s.precision) == (p.poll, p.precision)
    assert _scapy_raw(s, "delay") == p.root_delay
    assert _scapy_raw(s, "dispersion") == p.root_dispersion
    for ours, theirs in [("reference_ts", "ref"), ("origin_ts", "orig"),
                         ("receive_ts", "recv"), ("transmit_ts", "sent")]:
        assert _scapy_raw(s, theirs) == getattr(p, ours)


@given(headers)
def test_scapy_built_decode_with_ours(p: NtpPacket) -> None:
    ref = {"ref_id": p.reference_id} if p.stratum < 2 else {"id": ".".join(
        str(b) for b in p.reference_id)}
    s = NTPHeader(
        leap=p.leap, version=p.version, mode=p.mode, stratum=p.stratum, poll=p.poll,
        precision=p.precision, delay=Fraction(p.root_delay, 1 << 16),
        dispersion=Fraction(p.root_dispersion, 1 << 16), ref=Fraction(p.reference_ts, 1 << 32),
        orig=Fraction(p.origin_ts, 1 << 32), recv=Fraction(p.receive_ts, 1 << 32),
        sent=Fraction(p.transmit_ts, 1 << 32), **ref,
    )
    assert decode(bytes(s)) == p


def test_extensions_and_mac_cross_check_with_scapy() -> None:
    # scapy only splits extension fields correctly when a MAC follows them
    mac = struct.pack("!I", 7) + bytes(range(16))
    ours = NtpPacket(transmit_ts=5, mac=mac, extensions=(
        ExtensionField(ExtType.UNIQUE_IDENTIFIER, b"u" * 32),
        ExtensionField(ExtType.NTS_COOKIE, b"c" * 40)))
    s = NTPHeader(ours.encode())
    assert [(e.type, e.len, bytes(e.value)) for e in s[NTPExtensions].extensions] == [
        (0x0104, 36, b"u" * 32), (0x0204, 44, b"c" * 40)]
    assert s[NTPAuthenticator].key_id == 7 and bytes(s[NTPAuthenticator].dgst) == mac[4:]

    theirs = NTPHeader(mode=3, sent=0, orig=0) / NTPExtensions(
        extensions=[NTPExtension(type=0x0104, len=36, value=Raw(b"y" * 32))],
        mac=NTPAuthenticator(key_id=9, dgst=b"d" * 16))
    p = decode(bytes(theirs))
    assert p.extensions == (ExtensionField(0x0104, b"y" * 32),)
    assert p.mac == struct.pack("!I", 9) + b"d" * 16


# --- ntplib -----------------------------------------------------------------------------


def test_ntplib_built_decode_with_ours() -> None:
    n = ntplib.NTPPacket(version=3, mode=3, tx_timestamp=3_913_056_000.5)
    n.leap, n.stratum, n.poll, n.precision = 1, 3, 10, -18
    n.root_delay, n.root_dispersion, n.ref_id = 0.75, 0.0625, 0x0A000001
    n.ref_timestamp, n.orig_timestamp, n.recv_timestamp = 3_913_055_000.0, 1.25, 2.0
    p = decode(n.to_data())
    assert (p.leap, p.version, p.mode, p.stratum, p.poll, p.precision) == (1, 3, 3, 3, 10, -18)
    assert (p.root_delay, p.root_dispersion) == (0.75 * 65536, 0.0625 * 65536)
    assert p.reference_id == b"\x0a\x00\x00\x01"
    assert p.transmit_ts == 3_913_056_000 << 32 | 1 << 31
    assert p.reference_ts == 3_913_055_000 << 32
    assert (p.origin_ts, p.receive_ts) == (5 << 30, 2 << 32)


@given(headers.filter(lambda p: p.poll >= 0))  # ntplib unpacks poll unsigned
def test_ours_decode_with_ntplib(p: NtpPacket) -> None:
    n = ntplib.NTPPacket()
    n.from_data(p.encode())
    assert (n.leap, n.version, n.mode, n.stratum) == (p.leap, p.version, p.mode, p.stratum)
    assert (n.poll, n.precision) == (p.poll, p.precision)
    assert n.root_delay == p.root_delay / 65536
    assert n.root_dispersion == p.root_dispersion / 65536
    assert n.ref_id == int.from_bytes(p.reference_id, "big")
    # ntplib keeps timestamps as floats: compare within a float's resolution
    assert n.tx_timestamp == pytest.approx(p.transmit_ts / 2**32, rel=1e-15, abs=1e-9)
    assert n.orig_timestamp == pytest.approx(p.origin_ts / 2**32, rel=1e-15, abs=1e-9)


# --- hypothesis: round trip and robustness ------------------------------------------------


@given(packets())
def test_round_trip(p: NtpPacket) -> None:
    data = p.encode()
    assert len(data) % 4 == 0
    assert decode(data) == p


@given(st.binary(min_size=0, max_size=40), st.integers(0, 0xFFFF))
def test_extension_bodies_are_zero_padded(body: bytes, ef_type: int) -> None:
    p = NtpPacket(extensions=(ExtensionField(ef_type, body),))
    (ef,) = decode(p.encode()).extensions
    assert ef.type == ef_type
    assert ef.body[: len(body)] == body and set(ef.body[len(body):]) <= {0}
    assert len(ef.body) + 4 >= 28  # last field, no MAC: padded to the RFC 7822 minimum


@given(st.binary(max_size=MAX_PACKET_LEN + 8))
def test_arbitrary_bytes_decode_or_raise_packet_error(data: bytes) -> None:
    try:
        decode(data)
    except PacketError as exc:
        assert exc.reason


@given(packets(), st.data())
def test_truncations_decode_or_raise_packet_error(p: NtpPacket, data: st.DataObject) -> None:
    raw = p.encode()
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode(raw[:cut])
    except PacketError as exc:
        assert exc.reason


@given(packets(), st.data())
def test_corrupted_extension_lengths_raise_packet_error_only(
        p: NtpPacket, data: st.DataObject) -> None:
    raw = bytearray(p.encode())
    if len(raw) <= 52:
        return
    pos = data.draw(st.integers(48, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(raw))
    except PacketError as exc:
        assert exc.reason


# --- named decode errors ----------------------------------------------------------------


def _header(first: int = 0x23) -> bytes:
    return bytes([first]) + b"\0" * 47


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "truncated"),
    (_header()[:47], "truncated"),
    (_header() + b"\0" * (MAX_PACKET_LEN - 47), "oversized"),
    (_header() + b"\0\0", "misaligned"),
    (_header(0x03), "bad_version"),  # version 0
    (_header(0x2B), "bad_version"),  # version 5
    (_header() + struct.pack("!HH", 0x104, 12) + b"\0" * 24, "bad_extension"),
    (_header() + struct.pack("!HH", 0x104, 30) + b"\0" * 24, "bad_extension"),
    (_header() + struct.pack("!HH", 0x104, 64) + b"\0" * 24, "truncated_extension"),
    (_header() + b"\0" * 16, "bad_mac"),
    (_header() + b"\0" * 4, "bad_mac"),
])
def test_decode_errors_are_named(data: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        decode(data)
    assert info.value.reason == reason


def test_version3_tail_is_kept_as_mac() -> None:
    p = decode(_header(0x1B) + b"k" * 20)
    assert p.version == 3 and p.mac == b"k" * 20 and p.extensions == ()


def test_find_extension_fields_by_type() -> None:
    cookie = ExtensionField(ExtType.NTS_COOKIE, b"c" * 28)
    uid = ExtensionField(ExtType.UNIQUE_IDENTIFIER, b"u" * 32)
    p = decode(NtpPacket(extensions=(uid, cookie, cookie)).encode())
    assert p.find(ExtType.NTS_COOKIE) == [cookie, cookie]
    assert p.find(ExtType.NTS_AUTHENTICATOR) == []


# --- encoding refusals --------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"reference_id": b"GPS"}, {"reference_id": b"GPSXX"}, {"stratum": 256}, {"poll": 128},
    {"precision": -129}, {"root_delay": 1 << 32}, {"transmit_ts": 1 << 64}, {"leap": 4},
    {"mode": 8},
])
def test_encode_refuses_out_of_range_fields(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        NtpPacket(**changes).encode()  # type: ignore[arg-type]


# --- NTS authenticator body (RFC 8915 section 5.6) -----------------------------------------


@given(st.binary(max_size=40), st.binary(max_size=200))
def test_authenticator_body_round_trip(nonce: bytes, ciphertext: bytes) -> None:
    body = encode_authenticator_body(nonce, ciphertext)
    assert len(body) % 4 == 0
    assert decode_authenticator_body(body) == (nonce, ciphertext)


@pytest.mark.parametrize("body", [b"", b"\0\x10", struct.pack("!HH", 16, 16) + b"\0" * 20,
                                  struct.pack("!HH", 0xFFFF, 0) + b"\0" * 8])
def test_authenticator_body_malformed(body: bytes) -> None:
    with pytest.raises(PacketError) as info:
        decode_authenticator_body(body)
    assert info.value.reason == "bad_authenticator"


@given(st.binary(max_size=64))
def test_authenticator_body_arbitrary_bytes(body: bytes) -> None:
    try:
        decode_authenticator_body(body)
    except PacketError as exc:
        assert exc.reason == "bad_authenticator"
