"""Certificate dates are judged only after the TLS peer proved its key; the time floor.

A host carries the NTS-KE stream, so it can answer as the TLS server with any certificate it
has seen, e.g. an expired one for our server's name from the trusted CA (public in CT logs).
It cannot complete the handshake without the private key. Before the fix, OpenSSL's date
error at the Certificate message was final (``cert_expired``: the source was disabled for
good once synchronised); now it is ``peer_unproven`` unless the handshake completed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hostile_relay import cut_after_certificate
from nts_fixture import Authority, CertFiles, issue_cert, make_ca
from test_nts_session import MemoryServer, ke_response, pump

from timesyncd.nts.ke import KeError
from timesyncd.nts.ke_session import NtsKeSession
from timesyncd.time_floor import TimeFloor, parse_floor

NOW = dt.datetime.now(dt.UTC)


class ImpostorServer(MemoryServer):
    """Presents the certificate, then cannot go on: its first flight is cut after the
    Certificate message (the 2nd encrypted record), before CertificateVerify, which would
    need the private key. A path attacker replaying a public certificate looks like this."""

    def receive(self, data: bytes) -> bytes:
        return cut_after_certificate(super().receive(data))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, CertFiles, CertFiles]:
    base = tmp_path_factory.mktemp("pki")
    ca = make_ca(base)
    expired = issue_cert(ca, base, not_before=NOW - dt.timedelta(days=400), days=365,
                         stem="expired")
    valid = issue_cert(ca, base, stem="valid")
    return ca, expired, valid


def test_expired_certificate_from_a_peer_without_the_key_is_not_a_date_error(
        pki: tuple[Authority, CertFiles, CertFiles]) -> None:
    ca, expired, _ = pki
    session = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=True)
    with pytest.raises(KeError) as info:
        pump(session, ImpostorServer(expired, ke_response()), eof=True)
    assert info.value.reason == "peer_unproven"
    assert "cert_expired" in info.value.detail and "did not prove the key" in info.value.detail


def test_expired_certificate_from_a_peer_that_proved_its_key_is_misconfiguration(
        pki: tuple[Authority, CertFiles, CertFiles]) -> None:
    ca, expired, valid = pki
    session = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=True)
    with pytest.raises(KeError) as info:
        pump(session, MemoryServer(expired, ke_response()))
    assert info.value.reason == "cert_expired" and "misconfigured" in info.value.detail
    # the same certificate while time is untrusted: tolerated, to be re-checked later
    lenient = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=False)
    pump(lenient, MemoryServer(expired, ke_response()))
    assert lenient.result is not None and lenient.result.validity_unchecked
    # a valid certificate from a peer that cannot finish: an ordinary, retryable failure
    cut = NtsKeSession("localhost", cafile=str(ca.cert_file))
    with pytest.raises(KeError) as info:
        pump(cut, ImpostorServer(valid, ke_response()), eof=True)
    assert info.value.reason == "connection_closed"


def test_certificate_that_expired_before_the_floor_is_refused_even_in_bootstrap(
        pki: tuple[Authority, CertFiles, CertFiles]) -> None:
    ca, expired, valid = pki
    floor = TimeFloor(int((NOW - dt.timedelta(days=10)).timestamp() * 1e9), "configured")
    session = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=False,
                           floor=floor.datetime)
    with pytest.raises(KeError) as info:
        pump(session, MemoryServer(expired, ke_response()))
    assert info.value.reason == "cert_expired_before_floor"
    ok = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=False,
                      floor=floor.datetime)
    pump(ok, MemoryServer(valid, ke_response()))
    assert ok.result is not None and not ok.result.validity_unchecked


def test_dates_are_checked_at_the_floor_when_the_clock_reads_before_it(
        pki: tuple[Authority, CertFiles, CertFiles]) -> None:
    """A guest clock years behind would see the valid certificate as not yet valid; the
    floor (today, here) is a better lower bound than a clock known to be wrong."""
    ca, _, valid = pki
    floor = TimeFloor(int(NOW.timestamp() * 1e9))
    years_ago = int((NOW - dt.timedelta(days=3 * 365)).timestamp() * 1e9)
    session = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=True,
                           verify_time=floor.verify_time(years_ago), floor=floor.datetime)
    pump(session, MemoryServer(valid, ke_response()))
    assert session.result is not None
    assert repr(session.result).count("key") == 0 and "cookies" not in repr(session.result)


def test_time_floor_values(tmp_path: Path) -> None:
    release = TimeFloor.build()
    assert release.source == "release" and release.floor_ns <= int(NOW.timestamp() * 1e9)
    assert TimeFloor.build("2000-01-01") == release  # a configured floor only raises it
    later = TimeFloor.build("2099-01-01T00:00:00Z")
    assert later.source == "configured" and later.datetime.year == 2099
    assert not later.allows(release.floor_ns) and later.allows(later.floor_ns)
    assert later.step_allowed(later.floor_ns + 5, -5) and not later.step_allowed(later.floor_ns, -1)
    assert parse_floor("2027-03-04T05:06:07+01:00") == parse_floor("2027-03-04T04:06:07")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_floor("next tuesday")


def test_peer_that_stalls_after_an_expired_certificate_is_unproven_too(
        pki: tuple[Authority, CertFiles, CertFiles]) -> None:
    """The relay transport ends the exchange (timeout, stream closed): same verdict."""
    ca, expired, valid = pki
    for cert, want in ((expired, "peer_unproven"), (valid, "timeout")):
        session = NtsKeSession("localhost", cafile=str(ca.cert_file), time_trusted=True)
        server = ImpostorServer(cert, ke_response())
        assert session.receive_data(server.receive(session.start())) == b""  # waits for more
        error = session.abort(KeError("timeout", "no NTS-KE result in 10 s"))
        assert error.reason == want and session.error is error and session.done
        assert session.abort(KeError("stream_closed")) is error  # the first verdict stands
