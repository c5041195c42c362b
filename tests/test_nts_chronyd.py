"""NTS-KE and NTS-authenticated NTP against a real chronyd 4.3 on loopback.

chronyd runs with -x (it never touches the clock); our side only reads the clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nts_fixture import NtsServer, chronyd_nts, make_cert

from timesyncd.exchange import ClientExchange, Sample
from timesyncd.ntptime import ntp_to_unix_ns
from timesyncd.nts.ke import KeError
from timesyncd.nts.ke_io import nts_ke_tcp
from timesyncd.nts.ke_session import NtsKeResult, NtsKeSession
from timesyncd.nts.ntp import NtsError, NtsRejection, NtsState
from timesyncd.packet import ExtType, NtpPacket, decode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def chrony(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NtsServer]:
    with chronyd_nts(tmp_path_factory.mktemp("chronyd-nts")) as server:
        yield server


@pytest.fixture(scope="module")
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    yield sock
    sock.close()


def key_exchange(server: NtsServer, name: str = "localhost", cafile: Path | None = None,
                 time_trusted: bool = True) -> NtsKeResult:
    session = NtsKeSession(name, cafile=str(cafile or server.cafile), time_trusted=time_trusted)
    return asyncio.run(nts_ke_tcp(server.host, server.ke_port, session, timeout_s=5.0))


def exchange(sock: socket.socket, server: NtsServer, state: NtsState,
             port: int | None = None) -> tuple[bytes, bytes, int, int, int]:
    """One NTS request/reply; return (request, reply, transmit cookie, t1_ns, t4_ns)."""
    xmt = int.from_bytes(os.urandom(8), "big")
    request = state.request(NtpPacket(mode=3, poll=4, transmit_ts=xmt), os.urandom)
    t1 = time.time_ns()
    sock.sendto(request, (server.host, port or server.ntp_port))
    while True:
        reply, addr = sock.recvfrom(4096)
        if addr == (server.host, port or server.ntp_port):
            return request, reply, xmt, t1, time.time_ns()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_key_exchange_with_chronyd(chrony: NtsServer) -> None:
    first = key_exchange(chrony)
    assert first.aead_id == 15 and len(first.cookies) == 8
    assert all(len(c) >= 16 for c in first.cookies) and len(set(first.cookies)) == 8
    assert len(first.c2s_key) == len(first.s2c_key) == 32 and first.c2s_key != first.s2c_key
    assert (first.server, first.port) == ("localhost", chrony.ntp_port)
    assert not first.validity_unchecked
    second = key_exchange(chrony, name="127.0.0.1")
    assert second.c2s_key != first.c2s_key and second.server == "127.0.0.1"


@pytest.mark.parametrize(("name", "other_ca", "reason"),
                         [("wrong.example", False, "name_mismatch"),
                          ("localhost", True, "cert_untrusted")])
def test_key_exchange_refuses_wrong_name_or_ca(chrony: NtsServer, tmp_path: Path, name: str,
                                               other_ca: bool, reason: str) -> None:
    cafile = make_cert(tmp_path).cert if other_ca else chrony.cafile
    before = open_fds()
    with pytest.raises(KeError) as info:
        key_exchange(chrony, name=name, cafile=cafile)
    assert info.value.reason == reason
    assert open_fds() == before  # the TCP connection was closed on failure


def test_authenticated_time_from_chronyd(chrony: NtsServer, udp: socket.socket) -> None:
    ke = key_exchange(chrony)
    state = NtsState(ke.c2s_key, ke.s2c_key, ke.cookies)
    for _ in range(5):
        _, reply, xmt, t1, t4 = exchange(udp, chrony, state, ke.port)
        packet = state.verify(reply)
        assert isinstance(packet, NtpPacket), packet
        assert packet.mode == 4 and packet.stratum == 5 and packet.origin_ts == xmt
        t2 = ntp_to_unix_ns(packet.receive_ts, t1)
        t3 = ntp_to_unix_ns(packet.transmit_ts, t4)
        offset_s = ((t1 - t2) + (t4 - t3)) / 2e9
        assert abs(offset_s) < 0.005 and 0 <= (t4 - t1) - (t3 - t2) < 0.1e9
        assert state.cookies == 8 and not state.needs_ke
    assert not state.rejected


def test_placeholders_refill_a_depleted_jar(chrony: NtsServer, udp: socket.socket) -> None:
    ke = key_exchange(chrony)
    state = NtsState(ke.c2s_key, ke.s2c_key, ke.cookies[:3])
    request, reply, *_ = exchange(udp, chrony, state)
    placeholders = decode(request).find(ExtType.NTS_COOKIE_PLACEHOLDER)
    assert len(placeholders) == 5 and all(len(p.body) == len(ke.cookies[0]) for p in placeholders)
    assert isinstance(state.verify(reply), NtpPacket)
    assert state.cookies == 8


def _strip_authenticator(reply: bytes) -> bytes:
    packet = decode(reply)
    auth = packet.find(ExtType.NTS_AUTHENTICATOR)[0]
    return reply[: len(reply) - 4 - len(auth.body)]


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda r: _flip(r, 47), "nts_bad_auth"),  # transmit timestamp, last byte
        (lambda r: _flip(r, 1), "nts_bad_auth"),  # stratum
        (lambda r: _flip(r, len(r) - 1), "nts_bad_auth"),  # ciphertext
        (_strip_authenticator, "nts_bad_auth"),
        (lambda r: _flip(r, 48 + 4 + 7), "nts_uid_mismatch"),  # unique identifier body
        (lambda r: r[:48], "nts_missing_uid"),
        (lambda r: r[:-4], "malformed:truncated_extension"),
        (lambda r: r[:30], "malformed:truncated"),
    ],
)
def test_tampered_replies_are_rejected(chrony: NtsServer, udp: socket.socket, tamper: object,
                                       reason: str) -> None:
    ke = key_exchange(chrony)
    state = NtsState(ke.c2s_key, ke.s2c_key, ke.cookies)
    _, reply, *_ = exchange(udp, chrony, state)
    assert callable(tamper)
    result = state.verify(tamper(reply))
    assert isinstance(result, NtsRejection) and result.reason == reason
    assert state.rejected[reason] == 1
    # a forgery does not cancel the outstanding request: the genuine reply still verifies
    assert isinstance(state.verify(reply), NtpPacket)


def test_replayed_reply_is_rejected(chrony: NtsServer, udp: socket.socket) -> None:
    ke = key_exchange(chrony)
    state = NtsState(ke.c2s_key, ke.s2c_key, ke.cookies)
    _, reply, *_ = exchange(udp, chrony, state)
    assert isinstance(state.verify(reply), NtpPacket)
    replay = state.verify(reply)
    assert isinstance(replay, NtsRejection) and replay.reason == "nts_unsolicited"
    _, fresh, *_ = exchange(udp, chrony, state)
    stale = state.verify(reply)  # old reply while a new request is outstanding
    assert isinstance(stale, NtsRejection) and stale.reason == "nts_uid_mismatch"
    assert isinstance(state.verify(fresh), NtpPacket)


def test_unknown_cookie_gets_nts_nak(chrony: NtsServer, udp: socket.socket) -> None:
    ke = key_exchange(chrony)
    state = NtsState(ke.c2s_key, ke.s2c_key, [os.urandom(len(ke.cookies[0]))])
    _, reply, *_ = exchange(udp, chrony, state)
    result = state.verify(reply)
    assert isinstance(result, NtsRejection) and result.reason == "nts_nak"
    assert result.kiss_code == "NTSN" and state.nak_received and state.cookies == 0
    with pytest.raises(NtsError, match="nts_no_cookies"):
        state.request(NtpPacket(mode=3, transmit_ts=1), os.urandom)


def test_bootstrap_with_not_yet_valid_certificate(tmp_path: Path, udp: socket.socket) -> None:
    """chronyd serves a cert valid only from next year: as if our clock were a year behind."""
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    cert = make_cert(tmp_path, not_before=future, days=365)
    with chronyd_nts(tmp_path / "srv", cert) as server:
        with pytest.raises(KeError) as info:
            key_exchange(server)
        assert info.value.reason == "cert_not_yet_valid"
        with pytest.raises(KeError) as info:
            key_exchange(server, name="wrong.example", time_trusted=False)
        assert info.value.reason == "name_mismatch"
        ke = key_exchange(server, time_trusted=False)
        assert ke.validity_unchecked and len(ke.cookies) == 8
        state = NtsState(ke.c2s_key, ke.s2c_key, ke.cookies)
        _, reply, *_ = exchange(udp, server, state)
        assert isinstance(state.verify(reply), NtpPacket)


def test_nts_composes_with_client_exchange(chrony: NtsServer, udp: socket.socket) -> None:
    """The seam the guest will use: ClientExchange builds the header and checks the timing,
    NtsState wraps it with NTS fields and authenticates the reply in between."""
    ke = key_exchange(chrony)
    state = NtsState(ke.c2s_key, ke.s2c_key, ke.cookies)
    client = ClientExchange()
    for _ in range(3):
        t1 = time.time_ns()
        header = decode(client.request(int.from_bytes(os.urandom(8), "big") | 1, t1))
        udp.sendto(state.request(header, os.urandom), (chrony.host, ke.port))
        reply, _ = udp.recvfrom(4096)
        packet = state.verify(reply)
        assert isinstance(packet, NtpPacket), packet
        sample = client.receive_packet(packet, time.time_ns())
        assert isinstance(sample, Sample), sample
        assert sample.stratum == 5 and abs(sample.offset_s) < 0.005 and sample.delay_s < 0.1
