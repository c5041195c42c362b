"""Example: the application's validators, a week on a simulated enclave clock.

Run with ``pytest examples/`` (timesync[pytest] installed). They pass on the default
``discipline`` strategy (timesync in the guest); ``pytest examples/
--enclave-clock-strategy none`` shows what happens without time sync: both fail near day 2.7,
the day ``timesync drift-sim`` reports for seed 1 (JWT, leeway 3 s; X.509 with ``--backdate
3``).

The outside world (identity provider, CA) works on *true* time: ``enclave_clock.true_time``.
The code under test reads the *guest* clock through ``time``/``datetime`` as usual.
"""

from __future__ import annotations

import datetime as dt

import jwt
import pytest
from app_validators import check_client_certificate, validate_session_token
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY = "example-signing-key-of-32-bytes-at-least"
TRANSIT_S = 0.02  # issuer to enclave, as drift-sim's --transit
CA_BACKDATE_S = 3  # our CA backdates notBefore by 3 s (drift-sim --backdate 3)


@pytest.mark.enclave_clock(days=7, seed=1)
def test_session_tokens_are_accepted_all_week(enclave_clock):
    def check():
        iat = int(enclave_clock.true_time.timestamp())  # the IdP's clock is right
        token = jwt.encode({"sub": "alice", "iat": iat, "nbf": iat, "exp": iat + 300}, KEY)
        enclave_clock.advance(TRANSIT_S)
        validate_session_token(token, KEY)

    failure = enclave_clock.first_failure(check, every="10m")
    assert failure is None, failure


@pytest.fixture(scope="module")
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example CA")])
    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    return key, cert


@pytest.mark.enclave_clock(days=7, seed=1)
def test_fresh_client_certificates_are_accepted_all_week(enclave_clock, ca):
    ca_key, ca_cert = ca
    client_key = ec.generate_private_key(ec.SECP256R1())

    def check():
        issued = enclave_clock.true_time.replace(microsecond=0)  # DER keeps whole seconds
        not_before = issued - dt.timedelta(seconds=CA_BACKDATE_S)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
                .issuer_name(ca_cert.subject).public_key(client_key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(not_before)
                .not_valid_after(not_before + dt.timedelta(hours=1))
                .sign(ca_key, hashes.SHA256()))
        enclave_clock.advance(TRANSIT_S)
        check_client_certificate(cert, ca_cert)

    failure = enclave_clock.first_failure(check, every="10m")
    assert failure is None, failure
