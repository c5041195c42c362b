"""Sans-IO NTS-KE client session: TLS 1.3 over pyOpenSSL memory BIOs (RFC 8915 section 4).

The caller moves bytes: :meth:`NtsKeSession.start` gives the ClientHello, every chunk received
from the server goes into :meth:`NtsKeSession.receive_data` (which returns bytes to send back),
and :meth:`NtsKeSession.receive_eof` reports the end of the stream. When :attr:`result` is set
the session holds the exported C2S/S2C keys and the cookies. No socket, no clock read by us.

Certificate validity dates and the bootstrap problem
----------------------------------------------------
A confidential guest may boot with a clock that is years off, and NTS is how it wants to learn
the time; but TLS checks certificate dates against that same clock, so strict checking would
refuse every server (a chicken-and-egg loop). With ``time_trusted=False`` the session still
verifies the chain to the configured CA and the server name, but tolerates exactly the two
date errors (not yet valid, expired). This is the trade chrony makes with ``nocerttimecheck``:
it only lets in a certificate our CA really issued for this name, possibly an expired one
whose key may since have leaked. Callers should therefore set ``time_trusted=True`` once the
clock is synchronised (from several sources) and redo NTS-KE when a result says
``validity_unchecked``. ``verify_time`` lets the caller check dates against its own notion of
time (e.g. the disciplined guest clock) instead of the host's system clock, which OpenSSL
would otherwise read.

Dates are judged only after the peer proved its key
---------------------------------------------------
OpenSSL checks the chain, dates included, when the Certificate message arrives: before the
peer has shown it holds the certificate's private key (CertificateVerify, Finished). Anyone in
the path can replay an expired certificate for our name (they are public, e.g. in Certificate
Transparency logs), so a date error at that point says nothing about the server. The session
therefore records date errors during the handshake and judges them only once the handshake
completed: a peer that proved the key of a certificate outside its dates is a misconfigured
server (``cert_expired``, ``cert_not_yet_valid``, ``cert_expired_before_floor``); a peer
that presented such a certificate and then failed the handshake could not prove the key:
``peer_unproven``, someone in the path, retryable. ``floor`` (the time floor,
:mod:`timesyncd.time_floor`) rejects certificates whose notAfter is before it even while
dates are otherwise tolerated.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import struct
from dataclasses import dataclass, field
from enum import Enum

from cryptography import x509
from OpenSSL import SSL, crypto

from timesyncd.nts.ke import (
    AEAD_AES_SIV_CMAC_256,
    DEFAULT_NTP_PORT,
    NEXT_PROTOCOL_NTPV4,
    KeError,
    ResponseParser,
    build_request,
)

ALPN_NTSKE = b"ntske/1"
EXPORTER_LABEL = b"EXPORTER-network-time-security"
#: Key length per supported AEAD algorithm (AES-SIV-CMAC-256 uses two 128-bit keys).
AEAD_KEY_LENGTHS = {AEAD_AES_SIV_CMAC_256: 32}

_ERR_NOT_YET_VALID = 9  # X509_V_ERR_CERT_NOT_YET_VALID
_ERR_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_DATE_ERRORS = {_ERR_NOT_YET_VALID: "cert_not_yet_valid", _ERR_EXPIRED: "cert_expired"}
_UNTRUSTED_ERRORS = {2, 18, 19, 20, 21}  # no issuer / self-signed / unable to verify leaf
_READ_CHUNK = 16384


@dataclass(frozen=True)
class NtsKeResult:
    """Keys and cookies for NTS-protected NTP; ``server``/``port`` are where to send it.

    Keys and cookies are secrets: kept out of ``repr`` (logs, tracebacks, debuggers)."""

    aead_id: int
    c2s_key: bytes = field(repr=False)
    s2c_key: bytes = field(repr=False)
    cookies: tuple[bytes, ...] = field(repr=False)
    server: str
    port: int
    warnings: tuple[int, ...] = ()
    #: certificate dates were not checked (bootstrap): redo NTS-KE once time is trusted
    validity_unchecked: bool = False


class _Phase(Enum):
    NEW = "new"
    HANDSHAKE = "handshake"
    EXCHANGE = "exchange"
    DONE = "done"
    FAILED = "failed"


def export_keys(conn: SSL.Connection, aead_id: int) -> tuple[bytes, bytes]:
    """C2S and S2C keys via the TLS exporter, context per RFC 8915 section 5.1."""
    length = AEAD_KEY_LENGTHS[aead_id]

    def key(direction: int) -> bytes:
        context = struct.pack("!HHB", NEXT_PROTOCOL_NTPV4, aead_id, direction)
        return bytes(conn.export_keying_material(EXPORTER_LABEL, length, context))

    return key(0), key(1)


def name_matches(cert: x509.Certificate, server_name: str) -> bool:
    """RFC 6125 check of ``server_name`` against the certificate's subjectAltName only.

    IP addresses match iPAddress entries; DNS names match dNSName entries case-insensitively,
    with a wildcard allowed only as the whole leftmost label. No CN fallback (deprecated).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(server_name)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    want = server_name.rstrip(".").lower().split(".")
    for pattern in san.get_values_for_type(x509.DNSName):
        labels = pattern.rstrip(".").lower().split(".")
        if len(labels) != len(want):
            continue
        if labels == want or (labels[0] == "*" and len(labels) > 2 and labels[1:] == want[1:]):
            return True
    return False


class NtsKeSession:
    """One NTS-KE exchange with one server, as a client. Methods raise :class:`KeError`."""

    def __init__(
        self,
        server_name: str,
        *,
        cafile: str | None = None,
        time_trusted: bool = True,
        verify_time: dt.datetime | None = None,
        floor: dt.datetime | None = None,
        aead_ids: tuple[int, ...] = (AEAD_AES_SIV_CMAC_256,),
    ) -> None:
        """``server_name`` is verified against the certificate (and sent as SNI unless it is
        an IP address); ``cafile`` is a PEM bundle, or None for the system trust store;
        ``floor``: refuse certificates whose notAfter is before it, whatever the clock says."""
        unsupported = [a for a in aead_ids if a not in AEAD_KEY_LENGTHS]
        if not aead_ids or unsupported:
            raise ValueError(f"unsupported AEAD algorithms {unsupported or aead_ids}")
        self.server_name = server_name
        self.time_trusted = time_trusted
        self._aead_ids = aead_ids
        self._verify_error: str | None = None
        self._floor = floor
        #: date problems seen in the chain, judged once the handshake proved the peer's key
        self._date_error: str | None = None
        self._floor_error: str | None = None
        self._proven = False  # the handshake completed: the peer holds the certificate's key
        self._dates_tolerated = False
        self._parser = ResponseParser(aead_ids)
        self._phase = _Phase.NEW
        self.result: NtsKeResult | None = None
        self.error: KeError | None = None

        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_alpn_protos([ALPN_NTSKE])
        if cafile is not None:
            ctx.load_verify_locations(cafile)
        else:
            ctx.set_default_verify_paths()
        store = ctx.get_cert_store()
        if verify_time is not None and store is not None:
            store.set_time(verify_time)
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._conn = SSL.Connection(ctx, None)
        if not _is_ip(server_name):
            self._conn.set_tlsext_host_name(server_name.encode("idna"))
        self._conn.set_connect_state()

    @property
    def done(self) -> bool:
        return self._phase in (_Phase.DONE, _Phase.FAILED)

    def start(self) -> bytes:
        """Begin the handshake; return the ClientHello to send."""
        if self._phase is not _Phase.NEW:
            raise RuntimeError("session already started")
        self._phase = _Phase.HANDSHAKE
        return self._step()

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes from the server; return bytes to send (possibly empty)."""
        if self._phase in (_Phase.NEW, _Phase.FAILED):
            raise RuntimeError(f"receive_data in phase {self._phase.value}")
        if self._phase is _Phase.DONE:
            return b""
        self._conn.bio_write(data)
        return self._step()

    def receive_eof(self) -> bytes:
        """The server closed the stream. Raise unless the response was already complete."""
        if self._phase is _Phase.DONE:
            return b""
        if self._phase is _Phase.HANDSHAKE:
            self._fail(KeError("connection_closed", "server closed during the TLS handshake"))
        self._conn.bio_shutdown()
        self._step()
        if self.result is None:
            self._fail(KeError("connection_closed", "server closed before End of Message"))
        return b""

    def abort(self, exc: KeError) -> KeError:
        """The transport failed (stream closed with a reason, timeout): the error to report.

        A peer that presented a certificate outside its dates and then went quiet or hung up
        never proved its key, so that becomes ``peer_unproven``, as in the handshake."""
        if self._phase is _Phase.FAILED and self.error is not None:
            return self.error
        try:
            self._fail(exc)
        except KeError as failed:
            return failed
        raise AssertionError("unreachable")  # pragma: no cover

    # -- internals -------------------------------------------------------------------------

    def _step(self) -> bytes:
        try:
            if self._phase is _Phase.HANDSHAKE:
                self._handshake()
            if self._phase is _Phase.EXCHANGE:
                self._read_response()
        except KeError as exc:
            self._fail(exc)
        except SSL.Error as exc:
            self._fail(self._tls_error(exc))
        return self._drain()

    def _handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        self._proven = True
        self._judge_dates()  # the peer proved its key: its certificate's dates now mean something
        if self._conn.get_protocol_version_name() != "TLSv1.3":
            raise KeError("not_tls13", str(self._conn.get_protocol_version_name()))
        if self._conn.get_alpn_proto_negotiated() != ALPN_NTSKE:
            raise KeError("alpn_not_negotiated", "server did not select ntske/1")
        self._conn.sendall(build_request(self._aead_ids))
        self._phase = _Phase.EXCHANGE

    def _read_response(self) -> None:
        while True:
            try:
                chunk = self._conn.recv(_READ_CHUNK)
            except SSL.WantReadError:
                return
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return  # stream ended; receive_eof decides whether that was too early
            response = self._parser.feed(chunk)
            if response is not None:
                c2s, s2c = export_keys(self._conn, response.aead_id)
                self.result = NtsKeResult(
                    aead_id=response.aead_id, c2s_key=c2s, s2c_key=s2c,
                    cookies=response.cookies, server=response.server or self.server_name,
                    port=response.port if response.port is not None else DEFAULT_NTP_PORT,
                    warnings=response.warnings, validity_unchecked=self._dates_tolerated,
                )
                self._phase = _Phase.DONE
                try:
                    self._conn.shutdown()  # queue close_notify; the peer may close first
                except SSL.Error:
                    pass
                return

    def _drain(self) -> bytes:
        out = b""
        while True:
            try:
                out += self._conn.bio_read(_READ_CHUNK)
            except SSL.WantReadError:
                return out

    def _judge_dates(self) -> None:
        if self._floor_error is not None:
            raise KeError("cert_expired_before_floor", self._floor_error)
        if self._date_error is None:
            return
        if self.time_trusted:
            raise KeError(self._date_error, f"server {self.server_name!r} completed the TLS "
                          "handshake with this certificate: the server is misconfigured")
        self._dates_tolerated = True

    def _fail(self, exc: KeError) -> None:
        problem = self._floor_error or self._date_error
        if not self._proven and problem is not None and self._verify_error is None:
            # a certificate outside its dates from a peer that never proved its key: anyone
            # in the path can replay one, so this is not the server's fault (retry)
            exc = KeError("peer_unproven", f"certificate {problem}, then the handshake failed "
                          f"({exc.reason}): the peer did not prove the key; someone in the "
                          "path?")
        self._phase = _Phase.FAILED
        self.error = exc
        raise exc

    def _tls_error(self, exc: SSL.Error) -> KeError:
        if self._verify_error is not None:
            return KeError(self._verify_error, f"server {self.server_name!r}")
        return KeError("tls_failed", str(exc))

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int,
                ok: int) -> bool:
        """OpenSSL verify callback: record date errors (judged after the handshake), check the
        floor and the name; any other chain error fails at once."""
        if self._floor is not None and self._floor_error is None:
            not_after = cert.to_cryptography().not_valid_after_utc
            if not_after < self._floor:
                self._floor_error = (f"notAfter {not_after:%Y-%m-%d} is before the time floor "
                                     f"{self._floor:%Y-%m-%d} (depth {depth})")
        if not ok:
            if errnum in _DATE_ERRORS:
                self._date_error = self._date_error or _DATE_ERRORS[errnum]
            else:
                self._verify_error = _verify_reason(errnum)
                return False
        if depth == 0 and not name_matches(cert.to_cryptography(), self.server_name):
            self._verify_error = "name_mismatch"
            return False
        return True


def _verify_reason(errnum: int) -> str:
    if errnum in _DATE_ERRORS:
        return _DATE_ERRORS[errnum]
    if errnum in _UNTRUSTED_ERRORS:
        return "cert_untrusted"
    return f"cert_invalid_{errnum}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
