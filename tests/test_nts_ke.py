"""NTS-KE record codec: round trips, request layout, and strict response parsing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from timesyncd.nts.ke import (
    AEAD_AES_SIV_CMAC_256,
    MAX_COOKIES,
    KeError,
    Record,
    RecordType,
    ResponseParser,
    build_request,
    decode_records,
    parse_response,
)

NEXT = Record(RecordType.NEXT_PROTOCOL, b"\0\0", critical=True)
AEAD = Record(RecordType.AEAD_ALGORITHM, struct.pack("!H", AEAD_AES_SIV_CMAC_256), critical=True)
EOM = Record(RecordType.END_OF_MESSAGE, critical=True)


def cookie(i: int) -> Record:
    return Record(RecordType.NEW_COOKIE, bytes([i]) * 64)


def response(*records: Record) -> bytes:
    return b"".join(r.encode() for r in records)


def good(*extra: Record) -> bytes:
    return response(NEXT, AEAD, *extra, *(cookie(i) for i in range(8)), EOM)


@given(st.lists(st.tuples(st.integers(0, 0x7FFF), st.binary(max_size=300), st.booleans()),
                max_size=8))
def test_records_round_trip(items: list[tuple[int, bytes, bool]]) -> None:
    recs = [Record(t, b, c) for t, b, c in items]
    data = b"".join(r.encode() for r in recs)
    decoded, used = decode_records(data)
    assert decoded == recs and used == len(data)
    # a truncated stream yields only the whole records and leaves the rest unconsumed
    if data:
        partial, used = decode_records(data[:-1])
        assert partial == recs[: len(partial)] and used < len(data)


def test_request_layout_matches_rfc8915() -> None:
    req = build_request()
    assert req.hex() == "80010002" "0000" "00040002" "000f" "80000000"
    recs, _ = decode_records(build_request((15, 17), server="a.example", port=4460))
    assert [(r.type, r.critical) for r in recs] == [(1, True), (4, False), (6, False),
                                                   (7, False), (0, True)]
    assert recs[1].body == b"\0\x0f\0\x11" and recs[2].body == b"a.example"
    assert recs[3].body == struct.pack("!H", 4460)


def test_parse_good_response_with_server_and_port() -> None:
    data = good(Record(RecordType.NTPV4_SERVER, b"ntp.example"),
                Record(RecordType.NTPV4_PORT, b"\x12\x34"),
                Record(0x4242, b"ignored non-critical"))
    resp = parse_response(data)
    assert resp.aead_id == 15 and resp.cookies == tuple(bytes([i]) * 64 for i in range(8))
    assert (resp.server, resp.port, resp.warnings) == ("ntp.example", 0x1234, ())
    assert "cookies" not in repr(resp) and (b"\0" * 64).hex() not in repr(resp)


def test_unknown_warning_code_aborts_the_exchange() -> None:
    """No Warning code is registered (RFC 8915 section 7.6): one we cannot interpret must not
    be silently accepted with the keys."""
    with pytest.raises(KeError) as info:
        parse_response(good(Record(RecordType.WARNING, b"\0\x07")))
    assert info.value.reason == "unknown_warning" and "code 7" in str(info.value)


@pytest.mark.parametrize("name", ["ntp.example", "ntp.example.", "192.0.2.1", "2001:db8::1",
                                  "::1", "a-b.c1", "xn--bcher-kva.example", "localhost"])
def test_server_record_accepts_ip_addresses_and_domain_names(name: str) -> None:
    assert parse_response(good(Record(RecordType.NTPV4_SERVER, name.encode()))).server == name


@pytest.mark.parametrize("name", [b"a b", b"host:123", b"udp:evil:1", b"1.2.3.4.5", b"999.1.1.1",
                                  b"fe80::1%eth0", b"[::1]", b"-a.example", b"a..b", b"a_b.c",
                                  b"a/b", b"a\nb", b"x" * 64 + b".example", b"192.0.2.1."])
def test_server_record_refuses_what_is_not_an_address_or_fqdn(name: bytes) -> None:
    """RFC 8915 section 4.1.7: the Server record is built into a ``udp:`` relay name, so
    anything but an IPv4/IPv6 address or a domain name is refused, not guessed at."""
    with pytest.raises(KeError) as info:
        parse_response(good(Record(RecordType.NTPV4_SERVER, name)))
    assert info.value.reason == "bad_server"


def test_parser_is_incremental_byte_by_byte() -> None:
    data = good()
    parser = ResponseParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is None for r in results[:-1]) and results[-1] is not None
    assert len(results[-1].cookies) == 8


def test_extra_cookies_are_capped() -> None:
    data = response(NEXT, AEAD, *(cookie(i) for i in range(20)), EOM)
    assert len(parse_response(data).cookies) == MAX_COOKIES


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (response(NEXT, AEAD, cookie(1)), "incomplete"),
        (good()[:-1], "incomplete"),
        (good() + EOM.encode(), "trailing_data"),
        (response(Record(RecordType.ERROR, b"\0\1"), EOM), "server_error"),
        (response(Record(RecordType.ERROR, b"\0"), EOM), "bad_record"),
        (response(AEAD, cookie(1), EOM), "missing_next_protocol"),
        (response(Record(1, b"", True), AEAD, cookie(1), EOM), "bad_next_protocol"),
        (response(Record(1, b"\0\1", True), AEAD, cookie(1), EOM), "bad_next_protocol"),
        (response(Record(1, b"\0", True), AEAD, cookie(1), EOM), "bad_record"),
        (response(NEXT, NEXT, AEAD, cookie(1), EOM), "bad_record"),
        (response(NEXT, cookie(1), EOM), "missing_aead"),
        (response(NEXT, Record(4, b"\0\x11"), cookie(1), EOM), "bad_aead"),
        (response(NEXT, Record(4, b"\0\x0f\0\x0f"), cookie(1), EOM), "bad_aead"),
        (response(NEXT, AEAD, EOM), "no_cookies"),
        (response(NEXT, AEAD, Record(5, b""), EOM), "bad_cookie"),
        (response(NEXT, AEAD, cookie(1), Record(0x1234, b"x", True), EOM),
         "unrecognized_critical"),
        (response(NEXT, AEAD, cookie(1), Record(7, b"\0"), EOM), "bad_record"),
        (response(NEXT, AEAD, cookie(1), Record(6, b"a b"), EOM), "bad_server"),
        (response(NEXT, AEAD, cookie(1), Record(6, b"\xff"), EOM), "bad_record"),
        (response(NEXT, AEAD, cookie(1), Record(0, b"x", True)), "bad_record"),
    ],
)
def test_malformed_responses_have_named_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(KeError) as info:
        parse_response(data)
    assert info.value.reason == reason


def test_server_error_code_is_named() -> None:
    with pytest.raises(KeError, match="server_error: bad_request"):
        parse_response(response(Record(RecordType.ERROR, b"\0\1", True), EOM))


def test_oversized_response_is_refused_before_buffering_more() -> None:
    parser = ResponseParser()
    big = Record(0x4242, b"x" * 60000).encode()
    parser.feed(big)
    with pytest.raises(KeError) as info:
        parser.feed(big)
    assert info.value.reason == "response_too_long"


@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        parse_response(data)
    except KeError:
        pass
