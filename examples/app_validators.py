"""The application code under test: how a service in an enclave might check what it is given.

Nothing here knows about timesync: the validators read the wall clock as production code does
(PyJWT reads ``time``/``datetime``; the certificate check asks ``datetime.now``), which is
what the ``enclave_clock`` fixture replaces with the simulated guest clock.
"""

from __future__ import annotations

import datetime as dt

import jwt
from cryptography import x509

#: The leeway this application allows on iat/nbf/exp, seconds ("a few seconds").
JWT_LEEWAY_S = 3.0


def validate_session_token(token: str, key: str) -> dict[str, object]:
    """Decode and check a session JWT (signature, iat, nbf, exp) with our leeway."""
    return jwt.decode(token, key, algorithms=["HS256"], leeway=JWT_LEEWAY_S,
                      options={"require": ["iat", "nbf", "exp"], "verify_iat": True})


class CertificateNotValidNow(Exception):
    pass


def check_client_certificate(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Accept a client certificate signed by ``issuer`` and valid now (RFC 5280: inclusive).

    ``cryptography``'s chain verifier reads the clock itself (in Rust, out of freezegun's
    reach); code that uses it should pass ``.time(datetime.now(timezone.utc))`` explicitly,
    which also makes it testable here."""
    cert.verify_directly_issued_by(issuer)
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateNotValidNow(
            f"valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, now {now:%Y-%m-%d %H:%M:%S.%f}")
