"""Relay framing: payload helpers, incremental decoding under any chunking, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from timesyncd import framing
from timesyncd.framing import (
    HEADER,
    MAX_PAYLOAD,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    FramingError,
)

frames = st.builds(
    Frame,
    type=st.sampled_from(list(FrameType)),
    request_id=st.integers(0, (1 << 32) - 1),
    payload=st.binary(max_size=300) | st.binary(min_size=MAX_PAYLOAD, max_size=MAX_PAYLOAD),
)


def _chunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@given(st.lists(frames, max_size=6), st.lists(st.integers(0, 20_000), max_size=30))
def test_any_chunking_yields_the_same_frames(fs: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(f.encode() for f in fs)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for chunk in _chunk(stream, cuts):
        out += decoder.feed(chunk)
    assert out == fs
    assert decoder.pending == 0


def test_byte_at_a_time() -> None:
    f = framing.ntp_request(7, 2, b"\x23" + b"\0" * 47)
    decoder = FrameDecoder()
    data = f.encode()
    got = [fr for i in range(len(data)) for fr in decoder.feed(data[i : i + 1])]
    assert got == [f]


def test_pending_counts_an_incomplete_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(Frame(FrameType.HELLO, 0, b"abcdef").encode()[:9]) == []
    assert decoder.pending == 9


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=10))
def test_garbage_raises_only_framing_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in _chunk(data, cuts):
            for frame in decoder.feed(chunk):
                assert len(frame.payload) <= MAX_PAYLOAD
    except FramingError as exc:
        assert exc.reason in {"bad_version", "bad_type", "oversized"}


@pytest.mark.parametrize(("head", "reason"), [
    (HEADER.pack(2, FrameType.HELLO, 0, 0), "bad_version"),
    (HEADER.pack(1, 0, 0, 0), "bad_type"),
    (HEADER.pack(1, 99, 0, 0), "bad_type"),
    (HEADER.pack(1, FrameType.HELLO, MAX_PAYLOAD + 1, 0), "oversized"),
])
def test_bad_headers_are_named(head: bytes, reason: str) -> None:
    with pytest.raises(FramingError) as info:
        FrameDecoder().feed(head)
    assert info.value.reason == reason


def test_oversized_is_refused_before_buffering_the_payload() -> None:
    # the header alone is enough: a peer cannot make us wait for (and buffer) 64 KiB
    with pytest.raises(FramingError):
        FrameDecoder().feed(HEADER.pack(1, FrameType.NTP_REPLY, 0xFFFF, 1))


def test_encode_refuses_oversized_and_out_of_range() -> None:
    with pytest.raises(FramingError):
        Frame(FrameType.HELLO, 0, b"x" * (MAX_PAYLOAD + 1)).encode()
    with pytest.raises(FramingError):
        Frame(FrameType.HELLO, 1 << 32, b"").encode()
    with pytest.raises(FramingError):
        framing.ntp_request(1, 256, b"")


# --- payload helpers ----------------------------------------------------------------------


def test_ntp_request_round_trip() -> None:
    f = framing.ntp_request(42, 3, b"packet")
    (back,) = FrameDecoder().feed(f.encode())
    assert (back.type, back.request_id) == (FrameType.NTP_REQUEST, 42)
    assert framing.parse_ntp_request(back) == (3, b"packet")


def test_ntp_reply_round_trip_and_clamping() -> None:
    f = framing.ntp_reply(9, b"pkt", 1500, 250)
    assert framing.parse_ntp_reply(f) == (b"pkt", 1500, 250)
    clamped = framing.ntp_reply(9, b"pkt", -5, 1 << 40)
    assert framing.parse_ntp_reply(clamped) == (b"pkt", 0, 0xFFFF_FFFF)


def test_error_round_trip_truncates_long_messages() -> None:
    f = framing.error(5, ErrorCode.UPSTREAM_TIMEOUT, "upstream timed out")
    assert framing.parse_error(f) == (ErrorCode.UPSTREAM_TIMEOUT, "upstream timed out")
    long = framing.error(5, ErrorCode.BUSY, "é" * MAX_PAYLOAD)
    assert len(long.encode()) <= HEADER.size + MAX_PAYLOAD
    code, text = framing.parse_error(long)  # a split UTF-8 sequence decodes with a marker
    assert code == ErrorCode.BUSY and text.startswith("é")


def test_json_round_trip() -> None:
    hello = {"version": framing.VERSION, "upstreams": [{"index": 0, "name": "local"}]}
    f = framing.json_frame(FrameType.HELLO, 0, hello)
    assert framing.parse_json(f) == hello


@pytest.mark.parametrize(("parse", "payload"), [
    (framing.parse_ntp_request, b""),
    (framing.parse_ntp_reply, b"\0" * 7),
    (framing.parse_error, b"\0"),
])
def test_short_payloads_are_bad_payload(parse: object, payload: bytes) -> None:
    with pytest.raises(FramingError) as info:
        parse(Frame(FrameType.ERROR, 0, payload))  # type: ignore[operator]
    assert info.value.reason == "bad_payload"


@pytest.mark.parametrize("payload", [
    b"{", b"\xff\xfe\xfd", b"[" * MAX_PAYLOAD, b'{"a":' * 1000 + b"1" + b"}" * 1000,
])
def test_hostile_json_is_bad_payload_not_a_crash(payload: bytes) -> None:
    with pytest.raises(FramingError) as info:
        framing.parse_json(Frame(FrameType.HELLO, 0, payload))
    assert info.value.reason == "bad_payload"


@given(st.binary(max_size=200))
def test_parse_helpers_on_arbitrary_payloads(payload: bytes) -> None:
    f = Frame(FrameType.HEALTH, 1, payload)
    for parse in (framing.parse_ntp_request, framing.parse_ntp_reply, framing.parse_error,
                  framing.parse_json):
        try:
            parse(f)
        except FramingError as exc:
            assert exc.reason == "bad_payload"
