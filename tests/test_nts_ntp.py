"""NTS extension fields and per-source state, against a scripted in-test NTS server."""

from __future__ import annotations

import random

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given
from hypothesis import strategies as st

from timesyncd.nts.ntp import NTS_NAK_CODE, NtsError, NtsRejection, NtsState, decode_fields, seal
from timesyncd.packet import (
    HEADER_LEN,
    MAX_PACKET_LEN,
    ExtensionField,
    ExtType,
    NtpPacket,
    decode,
    decode_authenticator_body,
)

C2S, S2C = bytes(range(32)), bytes(range(32, 64))
COOKIES = [bytes([i]) * 100 for i in range(8)]


def rng(seed: int = 1) -> random.Random:
    return random.Random(seed)


def state(cookies: list[bytes] | None = None) -> NtsState:
    return NtsState(C2S, S2C, COOKIES if cookies is None else cookies)


def uid_of(request: bytes) -> bytes:
    return decode(request).find(ExtType.UNIQUE_IDENTIFIER)[0].body


def reply(request: bytes, *, cookies: int | None = None, uid: bytes | None = None,
          key: bytes = S2C, plaintext: bytes | None = None, stratum: int = 2,
          trailer: tuple[ExtensionField, ...] = (), transmit: int = 6) -> bytes:
    """What a correct server would send (one new cookie per cookie/placeholder), or a variant."""
    req = decode(request)
    wanted = len(req.find(ExtType.NTS_COOKIE)) + len(req.find(ExtType.NTS_COOKIE_PLACEHOLDER))
    n = wanted if cookies is None else cookies
    head = NtpPacket(mode=4, stratum=stratum, origin_ts=req.transmit_ts, receive_ts=5,
                     transmit_ts=transmit).encode()
    body = head + ExtensionField(ExtType.UNIQUE_IDENTIFIER, uid or uid_of(request)).encode()
    if plaintext is None:
        plaintext = b"".join(ExtensionField(ExtType.NTS_COOKIE, b"new%03d" % i + bytes(93))
                             .encode() for i in range(n))
    auth = seal(key, body, b"N" * 16, plaintext).encode(min_len=28)
    return body + auth + b"".join(ef.encode() for ef in trailer)


def test_request_layout_and_authenticator() -> None:
    s = state()
    extra = ExtensionField(0x2005, b"x" * 12)
    header = NtpPacket(mode=3, poll=6, transmit_ts=0x1122334455667788, extensions=(extra,))
    data = s.request(header, rng().randbytes)
    packet = decode(data)
    assert [ef.type for ef in packet.extensions] == [
        0x2005, ExtType.UNIQUE_IDENTIFIER, ExtType.NTS_COOKIE, ExtType.NTS_AUTHENTICATOR]
    assert packet.transmit_ts == header.transmit_ts and packet.poll == 6
    assert packet.find(ExtType.NTS_COOKIE)[0].body == COOKIES[0] and s.cookies == 7
    uid = packet.find(ExtType.UNIQUE_IDENTIFIER)[0].body
    r = rng()
    assert uid == r.randbytes(32) and len(data) % 4 == 0
    nonce, ciphertext = decode_authenticator_body(packet.extensions[-1].body)
    assert nonce == r.randbytes(16) and len(ciphertext) == 16
    auth_at = len(data) - 4 - len(packet.extensions[-1].body)
    assert AESSIV(C2S).decrypt(ciphertext, [data[:auth_at], nonce]) == b""
    # the server's key does not verify it: directions are not interchangeable
    with pytest.raises(InvalidTag):
        AESSIV(S2C).decrypt(ciphertext, [data[:auth_at], nonce])


def test_cookie_jar_keeps_target_with_placeholders() -> None:
    s = state(COOKIES[:2])
    req = s.request(NtpPacket(transmit_ts=1), rng().randbytes)
    placeholders = decode(req).find(ExtType.NTS_COOKIE_PLACEHOLDER)
    assert len(placeholders) == 6 and {p.body for p in placeholders} == {bytes(100)}
    assert isinstance(s.verify(reply(req)), NtpPacket) and s.cookies == 8
    # a full jar asks for no placeholders, and surplus cookies are not hoarded
    req = s.request(NtpPacket(transmit_ts=2), rng(2).randbytes)
    assert not decode(req).find(ExtType.NTS_COOKIE_PLACEHOLDER)
    assert isinstance(s.verify(reply(req, cookies=3)), NtpPacket) and s.cookies == 8


def test_each_cookie_is_used_once_then_ke_is_needed() -> None:
    s = state(COOKIES[:3])
    sent = [decode(s.request(NtpPacket(transmit_ts=i), rng(i).randbytes))
            .find(ExtType.NTS_COOKIE)[0].body for i in range(3)]
    assert sent == COOKIES[:3] and s.needs_ke
    with pytest.raises(NtsError) as info:
        s.request(NtpPacket(transmit_ts=9), rng().randbytes)
    assert info.value.reason == "nts_no_cookies"


def test_large_cookies_never_overflow_the_packet_limit() -> None:
    s = state([b"c" * 600])
    req = s.request(NtpPacket(transmit_ts=1), rng().randbytes)
    assert len(req) <= MAX_PACKET_LEN
    assert 0 < len(decode(req).find(ExtType.NTS_COOKIE_PLACEHOLDER)) < 7


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda req: reply(req, key=C2S), "nts_bad_auth"),
        (lambda req: reply(req)[: HEADER_LEN + 36], "nts_bad_auth"),
        (lambda req: reply(req, uid=b"u" * 32), "nts_uid_mismatch"),
        (lambda req: reply(req, cookies=0), "nts_no_cookies"),
        (lambda req: reply(req, plaintext=b"\0\0\0\x05abcd"), "malformed:bad_encrypted_extension"),
        (lambda req: reply(req)[:HEADER_LEN] + ExtensionField(ExtType.UNIQUE_IDENTIFIER,
                                                              uid_of(req)).encode() * 2,
         "malformed:duplicate_uid"),
        (lambda req: b"\x24" + bytes(46), "malformed:truncated"),
    ],
)
def test_bad_replies_are_rejected_and_counted(make: object, reason: str) -> None:
    s = state()
    req = s.request(NtpPacket(transmit_ts=1), rng().randbytes)
    assert callable(make)
    result = s.verify(make(req))
    assert isinstance(result, NtsRejection) and result.reason == reason, result
    assert s.rejected == {reason: 1}
    assert isinstance(s.verify(reply(req)), NtpPacket)


def test_only_encrypted_cookies_count() -> None:
    s = state(COOKIES[:1])
    req = s.request(NtpPacket(transmit_ts=1), rng().randbytes)
    planted = ExtensionField(ExtType.NTS_COOKIE, b"evil" * 25)
    assert isinstance(s.verify(reply(req, cookies=1, trailer=(planted,))), NtpPacket)
    assert s.cookies == 1
    sent = decode(s.request(NtpPacket(transmit_ts=2), rng(2).randbytes))
    assert sent.find(ExtType.NTS_COOKIE)[0].body.startswith(b"new000")


def test_nak_needs_matching_uid() -> None:
    s = state()
    req = s.request(NtpPacket(transmit_ts=1), rng().randbytes)

    def nak(uid: bytes) -> bytes:
        return NtpPacket(mode=4, stratum=0, reference_id=NTS_NAK_CODE, extensions=(
            ExtensionField(ExtType.UNIQUE_IDENTIFIER, uid),)).encode()

    forged = s.verify(nak(b"x" * 32))
    assert isinstance(forged, NtsRejection) and forged.reason == "nts_uid_mismatch"
    assert not s.needs_ke
    genuine = s.verify(nak(uid_of(req)))
    assert isinstance(genuine, NtsRejection) and genuine.reason == "nts_nak"
    assert s.nak_received and not s.needs_ke


def test_nak_keeps_the_jar_until_the_next_poll() -> None:
    """RFC 8915 section 5.7: a NAK (unauthenticated; the host can forge it) is refuted by a
    valid reply to the same request; unrefuted, the next poll drops the jar for NTS-KE."""
    s = state()

    def nak(request: bytes) -> bytes:
        return NtpPacket(mode=4, stratum=0, reference_id=NTS_NAK_CODE, extensions=(
            ExtensionField(ExtType.UNIQUE_IDENTIFIER, uid_of(request)),)).encode()

    req = s.request(NtpPacket(transmit_ts=1), rng().randbytes)
    assert s.verify(nak(req)).reason == "nts_nak"  # forged by the host...
    assert isinstance(s.verify(reply(req)), NtpPacket)  # ...and the genuine reply still counts
    assert not s.nak_received and not s.needs_ke and s.cookies == 8
    req = s.request(NtpPacket(transmit_ts=2), rng(3).randbytes)
    assert s.verify(nak(req)).reason == "nts_nak"
    assert s.cookies == 7 and not s.needs_ke  # kept until the next poll
    with pytest.raises(NtsError, match="nts_no_cookies"):
        s.request(NtpPacket(transmit_ts=3), rng(4).randbytes)
    assert s.needs_ke and s.cookies == 0


def test_unsolicited_and_misuse() -> None:
    s = state()
    result = s.verify(b"\x24" + bytes(47))
    assert isinstance(result, NtsRejection) and result.reason == "nts_unsolicited"
    with pytest.raises(ValueError):
        s.request(NtpPacket(transmit_ts=1), lambda n: b"short")
    with pytest.raises(ValueError):
        NtsState(b"k" * 16, S2C, COOKIES)


def test_decode_fields_round_trip() -> None:
    fields = (ExtensionField(ExtType.NTS_COOKIE, b"a" * 8), ExtensionField(0x1234, b""))
    assert decode_fields(b"".join(ef.encode(min_len=4) for ef in fields)) == fields


@given(st.binary(max_size=600))
def test_random_replies_never_crash(data: bytes) -> None:
    s = state()
    s.request(NtpPacket(transmit_ts=1), rng().randbytes)
    assert isinstance(s.verify(data), NtsRejection)
