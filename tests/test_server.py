"""build_server_reply: reply fields, refusals, and a real ntplib client over loopback UDP."""

from __future__ import annotations

import socket
import threading
import time

import ntplib
import pytest

from timesyncd.ntptime import ntp_to_unix_ns, short_to_seconds, unix_ns_to_ntp
from timesyncd.packet import ExtensionField, Leap, Mode, NtpPacket, PacketError, decode
from timesyncd.server import build_server_reply

NS = 1_000_000_000
T0 = 1_750_000_000 * NS
COOKIE = 0xDEAD_BEEF_0000_0001


def client_request(**changes: object) -> bytes:
    fields: dict[str, object] = {"version": 4, "mode": Mode.CLIENT, "poll": 7,
                                 "transmit_ts": COOKIE}
    fields.update(changes)
    return NtpPacket(**fields).encode()  # type: ignore[arg-type]


def reply(request: bytes, **kwargs: object) -> NtpPacket:
    args: dict[str, object] = {"stratum": 3, "reference_id": b"\x7f\0\0\1",
                               "reference_ns": T0 - 16 * NS}
    args.update(kwargs)
    return decode(build_server_reply(request, T0, T0 + 2000, **args))  # type: ignore[arg-type]


def test_reply_fields() -> None:
    r = reply(client_request(), precision=-23, root_delay_s=0.25, root_dispersion_s=0.125,
              leap=Leap.INSERT)
    assert (r.mode, r.version, r.poll, r.stratum, r.precision) == (4, 4, 7, 3, -23)
    assert r.leap == Leap.INSERT
    assert r.origin_ts == COOKIE  # the client's cookie comes back as our origin
    assert ntp_to_unix_ns(r.receive_ts, T0) == T0
    assert ntp_to_unix_ns(r.transmit_ts, T0) == T0 + 2000
    assert ntp_to_unix_ns(r.reference_ts, T0) == T0 - 16 * NS
    assert r.reference_id == b"\x7f\0\0\1"
    assert short_to_seconds(r.root_delay) == 0.25
    assert short_to_seconds(r.root_dispersion) == 0.125
    assert r.extensions == () and r.mac == b""


def test_reply_echoes_version_3() -> None:
    assert reply(client_request(version=3)).version == 3


def test_reply_drops_request_extension_fields() -> None:
    req = client_request(extensions=(ExtensionField(0x0104, b"u" * 32),))
    assert reply(req).extensions == ()


@pytest.mark.parametrize("mode", [Mode.SERVER, Mode.SYMMETRIC_ACTIVE, Mode.BROADCAST, 6, 7])
def test_refuses_anything_but_a_client_request(mode: int) -> None:
    with pytest.raises(PacketError) as info:
        reply(client_request(mode=mode))
    assert info.value.reason == "not_client_request"


def test_refuses_malformed_request_with_packet_error() -> None:
    with pytest.raises(PacketError) as info:
        build_server_reply(b"\x23" * 20, T0, T0, stratum=1, reference_id=b"GPS\0",
                           reference_ns=T0)
    assert info.value.reason == "truncated"


@pytest.mark.parametrize(("kwargs"), [{"stratum": 256}, {"stratum": -1},
                                      {"reference_id": b"GPS"}])
def test_refuses_bad_server_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        reply(client_request(), **kwargs)


# --- a real NTP client against a loopback responder ---------------------------------------

SERVER_AHEAD_S = 2.5


def _serve(sock: socket.socket, count: int, stop: threading.Event) -> None:
    """Answer up to ``count`` requests from a clock ``SERVER_AHEAD_S`` ahead of this host's."""
    sock.settimeout(0.2)
    ahead_ns = int(SERVER_AHEAD_S * NS)
    answered = 0
    while answered < count and not stop.is_set():
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        rx = time.time_ns() + ahead_ns
        try:
            out = build_server_reply(data, rx, time.time_ns() + ahead_ns, stratum=2,
                                     reference_id=b"\x7f\0\0\1", reference_ns=rx - NS)
        except PacketError:
            continue
        sock.sendto(out, peer)
        answered += 1


def test_ntplib_client_measures_the_offset() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        thread = threading.Thread(target=_serve, args=(sock, 3, stop), daemon=True)
        thread.start()
        client = ntplib.NTPClient()
        for _ in range(3):
            stats = client.request("127.0.0.1", port=port, version=4, timeout=2)
            # ntplib's offset is server minus client
            assert stats.offset == pytest.approx(SERVER_AHEAD_S, abs=0.01)
            assert 0 <= stats.delay < 0.05
            assert stats.stratum == 2 and stats.mode == 4 and stats.version == 4
            assert stats.leap == 0
            assert stats.orig_timestamp == pytest.approx(
                ntplib.system_to_ntp_time(time.time()), abs=1.0)
        thread.join(timeout=2)
        assert not thread.is_alive()
    finally:
        stop.set()
        sock.close()


def test_reply_timestamps_decode_with_ntplib() -> None:
    out = build_server_reply(client_request(), T0, T0 + 500_000_000, stratum=1,
                             reference_id=b"GPS\0", reference_ns=T0 - NS)
    p = ntplib.NTPPacket()
    p.from_data(out)
    assert ntplib.ntp_to_system_time(p.recv_timestamp) == pytest.approx(T0 / NS, abs=1e-6)
    assert ntplib.ntp_to_system_time(p.tx_timestamp) == pytest.approx(T0 / NS + 0.5, abs=1e-6)
    assert p.stratum == 1 and p.mode == 4
    assert p.orig_timestamp == pytest.approx(COOKIE / 2**32)
    assert unix_ns_to_ntp(T0) >> 32 == int(ntplib.system_to_ntp_time(T0 / NS))
