"""The PyJWT and X.509 examples of docs/CLOCKBOUND.md run against a real segment."""

from __future__ import annotations

import datetime as dt
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guest_client.clockbound_writer import ClockBoundWriter, PublishedBound
from timesyncd.clockbound import CLOCK_MONOTONIC_COARSE, BoundedClock, ClockStatus

ROOT = Path(__file__).resolve().parent.parent
REAL = 1_800_000_000  # the clock reading the test pins, Unix seconds
BOUND_S = 2.0


def load_examples() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "token_checks", ROOT / "docs/examples/token_checks.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def clock(tmp_path: Path) -> Iterator[BoundedClock]:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, void_after_s=60.0)
    w.write(PublishedBound(time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE), int(BOUND_S * 1e9),
                           1000, ClockStatus.SYNCHRONIZED))
    c = BoundedClock(path, realtime_ns=lambda: REAL * 1_000_000_000)
    yield c
    c.close()
    w.close()


def test_pyjwt_example_refuses_what_may_have_expired(clock: BoundedClock) -> None:
    ex = load_examples()

    def token(**claims: int) -> str:
        return jwt.encode(claims, "k" * 32, algorithm="HS256")

    assert ex.decode_jwt(token(iat=REAL - 60, exp=REAL + 60), "k" * 32, clock, ["HS256"])
    with pytest.raises(jwt.InvalidTokenError, match="uncertain: may_be_expired"):
        ex.decode_jwt(token(iat=REAL - 60, exp=REAL + 1), "k" * 32, clock, ["HS256"])
    with pytest.raises(jwt.InvalidTokenError, match="invalid: expired"):
        ex.decode_jwt(token(exp=REAL - 3), "k" * 32, clock, ["HS256"])
    with pytest.raises(jwt.InvalidTokenError, match="invalid: not_yet_valid"):
        ex.decode_jwt(token(iat=REAL + 3, exp=REAL + 60), "k" * 32, clock, ["HS256"])
    # a leeway larger than the uncertainty accepts it again
    assert ex.decode_jwt(token(exp=REAL + 1), "k" * 32, clock, ["HS256"], leeway_s=1.5)
    with pytest.raises(jwt.InvalidSignatureError):
        ex.decode_jwt(token(exp=REAL + 60), "x" * 32, clock, ["HS256"])


def _cert(subject: str, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey,
          sign_key: ec.EllipticCurvePrivateKey, not_after: int, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(dt.datetime.fromtimestamp(REAL - 86400, dt.UTC))
         .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             sign_key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName("svc.example")]),
                             critical=False)
             .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                          False, False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False))
    return b.sign(sign_key, hashes.SHA256())


def test_x509_example_verifies_at_both_ends_of_the_interval(clock: BoundedClock) -> None:
    ex = load_examples()
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = _cert("test CA", None, ca_key, ca_key, REAL + 86400, ca=True)
    good = _cert("svc", ca.subject, leaf_key, ca_key, REAL + 3600, ca=False)
    ex.verify_server_chain(good, [], [ca], "svc.example", clock)
    # notAfter 1 s ahead of the clock reading, inside the 2 s bound: it may have expired
    edge = _cert("svc", ca.subject, leaf_key, ca_key, REAL + 1, ca=False)
    with pytest.raises(Exception, match="(?i)expired|validity|not valid"):
        ex.verify_server_chain(edge, [], [ca], "svc.example", clock)
