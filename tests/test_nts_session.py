"""Sans-IO NTS-KE session against an in-memory pyOpenSSL server (no sockets, no chronyd).

Covers the TLS state machine, key export, name checks and the bootstrap date tolerance, with
certificates whose validity lies in the future or past instead of moving any clock.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from nts_fixture import CertFiles, make_cert
from OpenSSL import SSL

from timesyncd.nts.ke import (
    AEAD_AES_SIV_CMAC_256,
    KeError,
    Record,
    RecordType,
    build_request,
)
from timesyncd.nts.ke_session import EXPORTER_LABEL, NtsKeSession, name_matches

NOW = dt.datetime.now(dt.UTC)
COOKIES = [bytes([i]) * 40 for i in range(8)]


def ke_response(*extra: Record) -> bytes:
    recs = [
        Record(RecordType.NEXT_PROTOCOL, b"\0\0", True),
        Record(RecordType.AEAD_ALGORITHM, struct.pack("!H", AEAD_AES_SIV_CMAC_256), True),
        *extra,
        *(Record(RecordType.NEW_COOKIE, c) for c in COOKIES),
        Record(RecordType.END_OF_MESSAGE, b"", True),
    ]
    return b"".join(r.encode() for r in recs)


class MemoryServer:
    """A TLS 1.3 NTS-KE server over memory BIOs that answers with a canned response."""

    def __init__(self, cert: CertFiles, response: bytes, *, alpn: bool = True,
                 max_version: int | None = None, close_early: bool = False) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_file(str(cert.cert))
        ctx.use_privatekey_file(str(cert.key))
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
        if alpn:
            ctx.set_alpn_select_callback(
                lambda conn, protos: b"ntske/1" if b"ntske/1" in protos
                else SSL.NO_OVERLAPPING_PROTOCOLS)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_accept_state()
        self.response = response
        self.close_early = close_early
        self.request = b""
        self.answered = False

    def receive(self, data: bytes) -> bytes:
        self.conn.bio_write(data)
        try:
            self.conn.do_handshake()
            while True:
                self.request += self.conn.recv(4096)
        except (SSL.WantReadError, SSL.ZeroReturnError):
            pass  # ZeroReturn: the client's close_notify after the response
        except SSL.Error:
            pass  # handshake refused: send our alert and let the client report it
        if self.request == build_request() and not self.answered:
            self.answered = True
            self.conn.sendall(self.response[: len(self.response) // 2]
                              if self.close_early else self.response)
        out = b""
        try:
            while True:
                out += self.conn.bio_read(4096)
        except SSL.WantReadError:
            return out


def pump(session: NtsKeSession, server: MemoryServer, chunk: int = 1 << 20,
         eof: bool = False) -> None:
    """Shuttle bytes both ways (``chunk`` at a time towards the client) until quiet."""
    to_server = session.start()
    for _ in range(200):
        to_client = server.receive(to_server) if to_server else b""
        if not to_client:
            break
        to_server = b""
        for i in range(0, len(to_client), chunk):
            to_server += session.receive_data(to_client[i : i + chunk])
    if eof:
        session.receive_eof()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., CertFiles]:
    base = tmp_path_factory.mktemp("certs")
    cache: dict[tuple[object, ...], CertFiles] = {}

    def get(name: str = "localhost", not_before: dt.datetime | None = None,
            days: int = 30) -> CertFiles:
        key = (name, not_before, days)
        if key not in cache:
            cache[key] = make_cert(base, name=name, not_before=not_before, days=days,
                                   stem=f"c{len(cache)}")
        return cache[key]

    return get


def test_full_exchange_byte_by_byte_exports_rfc8915_keys(certs: Callable[..., CertFiles]
                                                         ) -> None:
    cert = certs()
    server = MemoryServer(cert, ke_response(Record(RecordType.NTPV4_PORT, b"\x10\x00")))
    session = NtsKeSession("localhost", cafile=str(cert.cert))
    pump(session, server, chunk=1)
    result = session.result
    assert result is not None and session.done and session.error is None
    assert result.cookies == tuple(COOKIES) and result.aead_id == 15
    assert (result.server, result.port, result.validity_unchecked) == ("localhost", 4096, False)
    # both ends derive the same keys from the exporter with the RFC 8915 context
    for direction, key in ((0, result.c2s_key), (1, result.s2c_key)):
        ctx = struct.pack("!HHB", 0, 15, direction)
        assert key == server.conn.export_keying_material(EXPORTER_LABEL, 32, ctx)
    assert result.c2s_key != result.s2c_key and len(result.c2s_key) == 32


def test_default_port_and_ip_address_server_name(certs: Callable[..., CertFiles]) -> None:
    cert = certs()
    session = NtsKeSession("127.0.0.1", cafile=str(cert.cert))
    pump(session, MemoryServer(cert, ke_response()))
    assert session.result is not None
    assert (session.result.server, session.result.port) == ("127.0.0.1", 123)


@pytest.mark.parametrize(
    ("server_kwargs", "reason"),
    [
        ({"alpn": False}, "alpn_not_negotiated"),
        ({"max_version": SSL.TLS1_2_VERSION}, "tls_failed"),
        ({"close_early": True}, "connection_closed"),
    ],
)
def test_protocol_failures_are_named(certs: Callable[..., CertFiles],
                                     server_kwargs: dict[str, Any], reason: str) -> None:
    cert = certs()
    session = NtsKeSession("localhost", cafile=str(cert.cert))
    with pytest.raises(KeError) as info:
        pump(session, MemoryServer(cert, ke_response(), **server_kwargs), eof=True)
    assert info.value.reason == reason and session.error is info.value and session.done
    assert session.result is None


def test_server_error_record_fails_session(certs: Callable[..., CertFiles]) -> None:
    cert = certs()
    bad = Record(RecordType.ERROR, b"\0\1", True).encode() + Record(0, b"", True).encode()
    session = NtsKeSession("localhost", cafile=str(cert.cert))
    with pytest.raises(KeError, match="server_error: bad_request"):
        pump(session, MemoryServer(cert, bad))


@pytest.mark.parametrize(
    ("name", "ca", "reason"),
    [("other.example", "same", "name_mismatch"), ("localhost", "other", "cert_untrusted")],
)
def test_wrong_name_or_ca_fails_verification(certs: Callable[..., CertFiles], name: str,
                                             ca: str, reason: str) -> None:
    cert = certs()
    cafile = cert.cert if ca == "same" else certs(name="localhost", days=31).cert
    session = NtsKeSession(name, cafile=str(cafile), time_trusted=False)
    with pytest.raises(KeError) as info:
        pump(session, MemoryServer(cert, ke_response()))
    assert info.value.reason == reason


@pytest.mark.parametrize("years", [5, -5])
def test_bootstrap_tolerates_dates_only_while_time_untrusted(
        certs: Callable[..., CertFiles], years: int) -> None:
    """A cert valid only in the future (or long expired) looks like a far-off local clock."""
    cert = certs(not_before=NOW + dt.timedelta(days=365 * years))
    strict = NtsKeSession("localhost", cafile=str(cert.cert))
    with pytest.raises(KeError) as info:
        pump(strict, MemoryServer(cert, ke_response()))
    assert info.value.reason == ("cert_not_yet_valid" if years > 0 else "cert_expired")

    lenient = NtsKeSession("localhost", cafile=str(cert.cert), time_trusted=False)
    pump(lenient, MemoryServer(cert, ke_response()))
    assert lenient.result is not None and lenient.result.validity_unchecked


def test_bootstrap_still_checks_name_and_chain(certs: Callable[..., CertFiles]) -> None:
    future = certs(not_before=NOW + dt.timedelta(days=3650))
    for name, cafile, reason in [("evil.example", future.cert, "name_mismatch"),
                                 ("localhost", certs().cert, "cert_untrusted")]:
        session = NtsKeSession(name, cafile=str(cafile), time_trusted=False)
        with pytest.raises(KeError) as info:
            pump(session, MemoryServer(future, ke_response()))
        assert info.value.reason == reason


def test_verify_time_checks_dates_against_the_callers_clock(
        certs: Callable[..., CertFiles]) -> None:
    """The guest can check dates against its disciplined clock, not the host's."""
    future = certs(not_before=NOW + dt.timedelta(days=3650))
    session = NtsKeSession("localhost", cafile=str(future.cert),
                           verify_time=NOW + dt.timedelta(days=3651))
    pump(session, MemoryServer(future, ke_response()))
    assert session.result is not None and not session.result.validity_unchecked
    current = certs()
    session = NtsKeSession("localhost", cafile=str(current.cert),
                           verify_time=NOW + dt.timedelta(days=3650))
    with pytest.raises(KeError, match="cert_expired"):
        pump(session, MemoryServer(current, ke_response()))


def test_name_matching_rules(tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(make_cert(tmp_path, name="*.ntp.example").cert
                                          .read_bytes())
    assert name_matches(cert, "a.ntp.example") and name_matches(cert, "A.NTP.example.")
    assert name_matches(cert, "127.0.0.1")
    assert not name_matches(cert, "ntp.example")
    assert not name_matches(cert, "a.b.ntp.example")
    assert not name_matches(cert, "127.0.0.2")
    assert not name_matches(cert, "::1")


def test_misuse_is_refused(certs: Callable[..., CertFiles]) -> None:
    with pytest.raises(ValueError):
        NtsKeSession("localhost", aead_ids=(17,))
    session = NtsKeSession("localhost", cafile=str(certs().cert))
    with pytest.raises(RuntimeError):
        session.receive_data(b"x")
    session.start()
    with pytest.raises(RuntimeError):
        session.start()
