"""ClientExchange: every rejection reason, the offset/delay maths and the residence bound."""

from __future__ import annotations

import dataclasses
import random
import socket
import time

import pytest
from chrony_fixture import chronyd
from hypothesis import given
from hypothesis import strategies as st

from timesyncd.exchange import ClientExchange, Rejection, Sample
from timesyncd.ntptime import seconds_to_short, unix_ns_to_ntp
from timesyncd.packet import ExtensionField, Leap, Mode, NtpPacket, decode
from timesyncd.server import build_server_reply

NS = 1_000_000_000
MS = 1_000_000
T0 = 1_700_000_000 * NS  # true time the request leaves the guest
COOKIE = 0x0123_4567_89AB_CDEF


def server_packet(cookie: int = COOKIE, t2: int = T0 + 10 * MS, t3: int = T0 + 11 * MS,
                  **changes: object) -> NtpPacket:
    """A valid stratum-2 reply to ``cookie``; ``changes`` break one field at a time."""
    packet = NtpPacket(
        leap=Leap.NONE, version=4, mode=Mode.SERVER, stratum=2, poll=4, precision=-20,
        root_delay=seconds_to_short(0.002), root_dispersion=seconds_to_short(0.001),
        reference_id=b"\x0a\x00\x00\x01", reference_ts=unix_ns_to_ntp(T0 - 60 * NS),
        origin_ts=cookie, receive_ts=unix_ns_to_ntp(t2), transmit_ts=unix_ns_to_ntp(t3),
    )
    return dataclasses.replace(packet, **changes)  # type: ignore[arg-type]


def exchange_with_request(t1: int = T0, **kwargs: float) -> ClientExchange:
    ex = ClientExchange(**kwargs)  # type: ignore[arg-type]
    ex.request(COOKIE, t1)
    return ex


def reject(result: Sample | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


def accept(result: Sample | Rejection) -> Sample:
    assert isinstance(result, Sample), result
    return result


# --- request ------------------------------------------------------------------------


def test_request_is_mode3_v4_carrying_only_the_cookie() -> None:
    ex = ClientExchange(precision=-22)
    ef = ExtensionField(0x0104, b"u" * 32)
    packet = decode(ex.request(COOKIE, T0, poll=6, extensions=(ef,)))
    assert (packet.mode, packet.version, packet.poll, packet.precision) == (3, 4, 6, -22)
    assert packet.transmit_ts == COOKIE
    # nothing else reveals the guest's clock
    assert packet.origin_ts == packet.receive_ts == packet.reference_ts == 0
    assert packet.extensions == (ef,)
    assert ex.outstanding


@pytest.mark.parametrize("cookie", [0, -1, 1 << 64])
def test_request_refuses_cookie_outside_64_bits(cookie: int) -> None:
    with pytest.raises(ValueError):
        ClientExchange().request(cookie, T0)


# --- the maths ----------------------------------------------------------------------


def test_offset_and_delay_from_known_timestamps() -> None:
    # guest runs 0.5 s ahead; 10 ms each way; the server holds the packet for 1 ms
    ex = exchange_with_request(t1=T0 + 500 * MS)
    s = accept(ex.receive(server_packet().encode(), t4_ns=T0 + 21 * MS + 500 * MS))
    assert s.offset_s == pytest.approx(0.5, abs=2e-9)
    assert s.delay_s == pytest.approx(0.020, abs=2e-9)
    assert s.path_delay_s == s.delay_s
    assert (s.t1_ns, s.t4_ns) == (T0 + 500 * MS, T0 + 521 * MS)
    assert abs(s.t2_ns - (T0 + 10 * MS)) <= 1 and abs(s.t3_ns - (T0 + 11 * MS)) <= 1
    assert (s.stratum, s.leap, s.reference_id, s.poll) == (2, 0, b"\x0a\x00\x00\x01", 4)
    assert s.root_delay_s == pytest.approx(0.002, abs=2e-5)
    assert s.root_dispersion_s == pytest.approx(0.001, abs=2e-5)
    # both precisions (2^-20 each) plus 15 ppm of the 21 ms round trip
    assert s.dispersion_s == pytest.approx(2 * 2**-20 + 15e-6 * 0.021)
    assert s.root_distance_s == pytest.approx(
        0.001 + s.root_dispersion_s + 0.010 + s.dispersion_s, abs=2e-5)


def test_guest_behind_gives_negative_offset() -> None:
    ex = exchange_with_request(t1=T0 - 2 * NS)
    s = accept(ex.receive(server_packet().encode(), t4_ns=T0 + 21 * MS - 2 * NS))
    assert s.offset_s == pytest.approx(-2.0, abs=2e-9)


def test_sent_replaces_t1_with_the_measured_send_time() -> None:
    ex = exchange_with_request(t1=T0 - 5 * MS)  # the driver's guess before sending
    ex.sent(T0)
    s = accept(ex.receive(server_packet().encode(), t4_ns=T0 + 21 * MS))
    assert s.t1_ns == T0
    assert s.offset_s == pytest.approx(0.0, abs=2e-9)
    assert s.delay_s == pytest.approx(0.020, abs=2e-9)


def test_residence_correction_removes_relay_asymmetry() -> None:
    # symmetric 10 ms network, but the relay held the request 6 ms and the reply 0 ms
    t2, t3 = T0 + 16 * MS, T0 + 17 * MS
    raw = accept(exchange_with_request().receive(
        server_packet(t2=t2, t3=t3).encode(), T0 + 27 * MS))
    assert raw.offset_s == pytest.approx(-0.003, abs=2e-9)  # the bias the relay causes
    s = accept(exchange_with_request().receive(
        server_packet(t2=t2, t3=t3).encode(), T0 + 27 * MS,
        residence_in_ns=6 * MS, residence_out_ns=0))
    assert s.offset_s == pytest.approx(0.0, abs=2e-9)
    assert s.delay_s == pytest.approx(0.026, abs=2e-9)  # raw delay kept for error bounds
    assert s.path_delay_s == pytest.approx(0.020, abs=2e-9)


def test_residence_larger_than_delay_is_ignored() -> None:
    packet = server_packet().encode()
    honest = accept(exchange_with_request().receive(packet, T0 + 21 * MS))
    lying = accept(exchange_with_request().receive(
        packet, T0 + 21 * MS, residence_in_ns=500 * MS, residence_out_ns=0))
    assert lying.offset_s == honest.offset_s
    assert lying.path_delay_s == lying.delay_s == honest.delay_s


def test_negative_residence_is_ignored() -> None:
    packet = server_packet().encode()
    honest = accept(exchange_with_request().receive(packet, T0 + 21 * MS))
    s = accept(exchange_with_request().receive(
        packet, T0 + 21 * MS, residence_in_ns=15 * MS, residence_out_ns=-10 * MS))
    assert (s.offset_s, s.path_delay_s) == (honest.offset_s, honest.delay_s)


@given(r_in=st.integers(-NS, NS), r_out=st.integers(-NS, NS))
def test_no_residence_claim_moves_offset_beyond_half_the_delay(r_in: int, r_out: int) -> None:
    packet = server_packet().encode()
    honest = accept(exchange_with_request().receive(packet, T0 + 21 * MS))
    s = accept(exchange_with_request().receive(packet, T0 + 21 * MS, r_in, r_out))
    assert abs(s.offset_s - honest.offset_s) <= s.delay_s / 2 + 1e-12
    assert 0 <= s.path_delay_s <= s.delay_s


def test_tiny_negative_delay_within_precision_is_clamped() -> None:
    # the server's clock ticked 200 ns more than ours across a zero-latency exchange
    ex = exchange_with_request()
    t4 = T0 + 800
    s = accept(ex.receive(server_packet(t2=T0, t3=T0 + 1000).encode(), t4))
    assert s.delay_s == 0.0


def test_era_boundary_2036() -> None:
    # the NTP seconds counter wraps at 2036-02-07T06:28:16Z during this exchange
    wrap_unix_ns = ((1 << 32) - 2_208_988_800) * NS
    t1 = wrap_unix_ns - 5 * MS
    ex = exchange_with_request(t1=t1)
    packet = server_packet(t2=t1 + 10 * MS, t3=t1 + 11 * MS)
    assert packet.receive_ts >> 32 == 0  # already in era 1
    s = accept(ex.receive(packet.encode(), t1 + 21 * MS))
    assert abs(s.t2_ns - (t1 + 10 * MS)) <= 1
    assert s.offset_s == pytest.approx(0.0, abs=2e-9)
    assert s.delay_s == pytest.approx(0.020, abs=2e-9)


def test_symmetric_passive_reply_is_accepted() -> None:
    ex = exchange_with_request()
    accept(ex.receive(server_packet(mode=Mode.SYMMETRIC_PASSIVE).encode(), T0 + 21 * MS))


def test_receive_packet_accepts_a_predecoded_reply() -> None:
    ex = exchange_with_request()
    s = accept(ex.receive_packet(server_packet(), T0 + 21 * MS))
    assert s.offset_s == pytest.approx(0.0, abs=2e-9)


def test_real_server_reply_round_trip() -> None:
    ex = ClientExchange()
    req = ex.request(COOKIE, T0 + 3 * MS)  # guest 3 ms ahead
    reply = build_server_reply(req, T0 + 10 * MS, T0 + 11 * MS, stratum=3,
                               reference_id=b"\x7f\0\0\1", reference_ns=T0 - NS)
    s = accept(ex.receive(reply, T0 + 24 * MS))
    assert s.offset_s == pytest.approx(0.003, abs=2e-9)
    assert s.stratum == 3


# --- rejections, one named test each ---------------------------------------------------


def test_reject_bad_mode() -> None:
    ex = exchange_with_request()
    r = reject(ex.receive(server_packet(mode=Mode.CLIENT).encode(), T0 + 21 * MS))
    assert r.reason == "bad_mode"
    assert ex.outstanding  # a reflected or broadcast packet does not cancel our request


def test_reject_broadcast_mode() -> None:
    ex = exchange_with_request()
    assert reject(ex.receive(server_packet(mode=Mode.BROADCAST).encode(), T0)).reason == "bad_mode"


def test_reject_origin_mismatch_keeps_request_open() -> None:
    ex = exchange_with_request()
    forged = server_packet(cookie=COOKIE ^ 1).encode()
    assert reject(ex.receive(forged, T0 + 21 * MS)).reason == "origin_mismatch"
    # the genuine reply arriving afterwards is still accepted
    accept(ex.receive(server_packet().encode(), T0 + 21 * MS))


def test_reject_reply_to_superseded_request() -> None:
    ex = exchange_with_request()
    ex.request(COOKIE + 1, T0 + NS)
    late = server_packet(cookie=COOKIE).encode()
    assert reject(ex.receive(late, T0 + NS)).reason == "origin_mismatch"


def test_reject_duplicate() -> None:
    ex = exchange_with_request()
    data = server_packet().encode()
    accept(ex.receive(data, T0 + 21 * MS))
    r = reject(ex.receive(data, T0 + 22 * MS))
    assert r.reason == "duplicate"
    assert not ex.outstanding


def test_reject_unsolicited() -> None:
    r = reject(ClientExchange().receive(server_packet().encode(), T0))
    assert r.reason == "unsolicited"


def test_reject_unsolicited_after_answer_with_other_origin() -> None:
    ex = exchange_with_request()
    accept(ex.receive(server_packet().encode(), T0 + 21 * MS))
    assert reject(ex.receive(server_packet(cookie=99).encode(), T0)).reason == "unsolicited"


@pytest.mark.parametrize("field", ["receive_ts", "transmit_ts"])
def test_reject_zero_timestamp(field: str) -> None:
    ex = exchange_with_request()
    r = reject(ex.receive(server_packet(**{field: 0}).encode(), T0 + 21 * MS))
    assert r.reason == "zero_timestamp"


def test_reject_unsynchronised_leap_indicator() -> None:
    ex = exchange_with_request()
    r = reject(ex.receive(server_packet(leap=Leap.UNSYNCHRONISED).encode(), T0 + 21 * MS))
    assert r.reason == "unsynchronised"


@pytest.mark.parametrize(
    ("refid", "reason", "code"),
    [(b"RATE", "kod_rate", "RATE"), (b"DENY", "kod_deny", "DENY"),
     (b"RSTR", "kod_rstr", "RSTR"), (b"NKEY", "kod_other", "NKEY"),
     (b"AB\0\0", "kod_other", "AB")],
)
def test_reject_kiss_of_death(refid: bytes, reason: str, code: str) -> None:
    ex = exchange_with_request()
    # real KoDs usually also carry LI=3: the kiss code must still be reported
    kod = server_packet(stratum=0, leap=Leap.UNSYNCHRONISED, reference_id=refid)
    r = reject(ex.receive(kod.encode(), T0 + 21 * MS))
    assert (r.reason, r.kiss_code) == (reason, code)
    assert not ex.outstanding  # the request was answered, if only with a kiss


@pytest.mark.parametrize("stratum", [16, 17, 255])
def test_reject_bad_stratum(stratum: int) -> None:
    ex = exchange_with_request()
    r = reject(ex.receive(server_packet(stratum=stratum).encode(), T0 + 21 * MS))
    assert r.reason == "bad_stratum"


def test_reject_root_distance() -> None:
    ex = exchange_with_request(max_root_distance_s=0.5)
    packet = server_packet(root_dispersion=seconds_to_short(0.6))
    r = reject(ex.receive(packet.encode(), T0 + 21 * MS))
    assert r.reason == "root_distance"


def test_root_distance_counts_our_own_round_trip() -> None:
    # server claims nothing, but a 1.2 s round trip alone is 0.6 s of possible error
    ex = exchange_with_request(max_root_distance_s=0.5)
    packet = server_packet(root_delay=0, root_dispersion=0)
    assert reject(ex.receive(packet.encode(), T0 + 1200 * MS)).reason == "root_distance"


def test_reject_bad_delay() -> None:
    ex = exchange_with_request()
    # the server claims to have held the packet 1 s, but the reply came back after 20 ms
    packet = server_packet(t2=T0 + 10 * MS, t3=T0 + 1010 * MS)
    assert reject(ex.receive(packet.encode(), T0 + 20 * MS)).reason == "bad_delay"


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"\x24" * 47, "malformed:truncated"), (b"\x24" + b"\0" * 49, "malformed:misaligned"),
     (b"\x04" + b"\0" * 47, "malformed:bad_version")],
)
def test_reject_malformed(data: bytes, reason: str) -> None:
    ex = exchange_with_request()
    assert reject(ex.receive(data, T0)).reason == reason
    assert ex.outstanding


# --- interop ------------------------------------------------------------------------------


def test_exchange_with_a_real_chronyd() -> None:
    """chronyd -x serves this host's clock, so the offset we measure must be about zero."""
    rng = random.Random(5)
    with chronyd(stratum=4) as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect((server.host, server.port))
        ex = ClientExchange()
        for _ in range(3):
            ex.request(rng.getrandbits(64) | 1, time.time_ns())
            data = ex.request(rng.getrandbits(64) | 1, time.time_ns())  # supersedes the first
            ex.sent(time.time_ns())
            sock.send(data)
            reply = sock.recv(2048)
            t4 = time.time_ns()
            s = accept(ex.receive(reply, t4))
            assert s.stratum == 4 and s.leap == 0
            assert abs(s.offset_s) < 0.005
            assert 0 <= s.delay_s < 0.05 and s.t1_ns <= s.t4_ns
            assert s.root_distance_s < 0.1
            assert reject(ex.receive(reply, t4)).reason == "duplicate"
