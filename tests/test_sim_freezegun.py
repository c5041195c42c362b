"""The simulator's token validators agree with real PyJWT and cryptography at frozen times.

Each check freezes the wall clock (freezegun) at a guest reading the simulator computes and asks
the real library; the simulator's answer (scalar and vectorised) must be identical.
"""

from __future__ import annotations

import datetime as dt

import jwt
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from freezegun import freeze_time

from sim.tokens import (
    NS,
    OffsetLookup,
    TokenConfig,
    TokenSchedule,
    jwt_accepts,
    jwt_claims,
    x509_accepts,
    x509_validity,
)

KEY = "test-secret-key-of-sufficient-length-32b"
OPTIONS = {"verify_signature": True, "verify_exp": True, "verify_nbf": True,
           "verify_iat": True, "require": ["iat", "nbf", "exp"]}
START_NS = 1_735_689_600 * NS  # 2025-01-01T00:00:00Z
US = 1000


def utc(ns: int) -> dt.datetime:
    """A datetime at ``ns`` floored to microseconds (what the frozen clock can represent)."""
    return dt.datetime.fromtimestamp(0, dt.UTC) + dt.timedelta(microseconds=ns // US)


def pyjwt_accepts(token: str, now_ns: int, leeway: float) -> bool:
    with freeze_time(utc(now_ns)):
        try:
            jwt.decode(token, KEY, algorithms=["HS256"], options=OPTIONS, leeway=leeway)
        except (jwt.ImmatureSignatureError, jwt.ExpiredSignatureError):
            return False
    return True


def mint(issue_ns: int, lifetime: int) -> tuple[str, tuple[int, int, int]]:
    iat, nbf, exp = jwt_claims(issue_ns, lifetime)
    return jwt.encode({"iat": iat, "nbf": nbf, "exp": exp, "sub": "guest"}, KEY,
                      algorithm="HS256"), (iat, nbf, exp)


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sim-ca")])


def issue_cert(ca: tuple[ec.EllipticCurvePrivateKey, x509.Name], issue_ns: int, backdate: int,
               lifetime: int) -> x509.Certificate:
    key, name = ca
    # A real CA passes its own (fractional) time minus the backdate; DER keeps whole seconds.
    nb = utc(issue_ns) - dt.timedelta(seconds=backdate)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(nb).not_valid_after(nb + dt.timedelta(seconds=lifetime))
            .sign(key, hashes.SHA256()))


def cryptography_accepts(cert: x509.Certificate, now_ns: int) -> bool:
    with freeze_time(utc(now_ns)):
        now = dt.datetime.now(dt.UTC)
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@pytest.mark.parametrize("leeway", [0.0, 3.0, 2.5])
def test_jwt_edges_match_pyjwt(leeway: float) -> None:
    issue = START_NS + 1234 * NS + 987_654_321  # fractional: iat is the floor
    token, (iat, nbf, exp) = mint(issue, 300)
    assert iat == START_NS // NS + 1234
    lw = round(leeway * 1e6) * US
    edges = [
        iat * NS - lw,            # earliest accepted ("not yet valid" boundary)
        iat * NS - lw - US,       # one microsecond too early: rejected
        iat * NS - lw - 1,        # sub-microsecond early floors to the previous microsecond
        issue,                    # at issue: guest slightly behind iat's fraction is still fine
        exp * NS + lw - US,       # last accepted microsecond
        exp * NS + lw,            # expired
        exp * NS + lw + 999,
    ]
    for now in edges:
        assert jwt_accepts(iat, nbf, exp, now, leeway) == pyjwt_accepts(token, now, leeway), now
    assert not jwt_accepts(iat, nbf, exp, iat * NS - lw - US, leeway)
    assert jwt_accepts(iat, nbf, exp, iat * NS - lw, leeway)


def test_jwt_integer_iat_gives_up_to_a_second() -> None:
    """A clock 0.9 s behind accepts a token minted at .95 (iat floors) with zero leeway."""
    issue = START_NS + 10 * NS + 950_000_000
    token, (iat, nbf, exp) = mint(issue, 60)
    now = issue - 900_000_000
    assert jwt_accepts(iat, nbf, exp, now, 0.0) and pyjwt_accepts(token, now, 0.0)
    now = issue - 960_000_000
    assert not jwt_accepts(iat, nbf, exp, now, 0.0) and not pyjwt_accepts(token, now, 0.0)


def test_x509_edges_match_cryptography(ca: tuple[ec.EllipticCurvePrivateKey, x509.Name]) -> None:
    issue = START_NS + 500 * NS + 250_000_000
    cert = issue_cert(ca, issue, backdate=30, lifetime=600)
    nb, na = x509_validity(issue, 30, 600)
    assert int(cert.not_valid_before_utc.timestamp()) == nb
    assert int(cert.not_valid_after_utc.timestamp()) == na
    for now in [nb * NS, nb * NS - 1, nb * NS - US, na * NS, na * NS + US - 1, na * NS + US,
                issue]:
        assert x509_accepts(nb, na, now) == cryptography_accepts(cert, now), now


def test_simulated_guest_times_match_real_libraries(
        ca: tuple[ec.EllipticCurvePrivateKey, x509.Name]) -> None:
    """Per-token: the vectorised tally's decision equals the real library at the guest time.

    The guest offset sweeps from +4 s to -5 s so validations land on both sides of every
    boundary (leeway 3 s, backdate 2 s).
    """
    cfg = TokenConfig(rate_per_s=1 / 20, jwt_leeway_s=3.0, jwt_lifetime_s=60,
                      x509_backdate_s=2, x509_lifetime_s=60, kinds=("jwt", "x509"))
    duration = 1800.0
    sched = TokenSchedule(cfg, START_NS, duration, seed=7)
    times = sched.query_times_ns()
    offsets = (4e9 - 9e9 * (times - START_NS) / (duration * NS)).astype(np.int64)
    lookup = OffsetLookup(times, offsets)
    checked = {"jwt": [0, 0], "x509": [0, 0]}
    for kind, k in sched.kinds.items():
        for i in range(len(k.issue_ns)):
            for when in (k.validate_ns[i], k.replay_ns[i]):
                if when > sched.end_ns:
                    continue
                now = int(when + lookup(np.array([when]))[0])
                vec = bool(sched.accepts(kind, k.lo[i:i + 1], k.hi[i:i + 1],
                                         np.array([now]))[0])
                if kind == "jwt":
                    token, (iat, nbf, exp) = mint(int(k.issue_ns[i]), cfg.jwt_lifetime_s)
                    assert (iat, exp) == (k.lo[i], k.hi[i])
                    real = pyjwt_accepts(token, now, cfg.jwt_leeway_s)
                else:
                    cert = issue_cert(ca, int(k.issue_ns[i]), 2, 60)
                    real = cryptography_accepts(cert, now)
                assert vec == real, (kind, i, now)
                checked[kind][real] += 1
    # the sweep really exercised both outcomes for both kinds
    assert all(min(v) > 5 for v in checked.values()), checked
