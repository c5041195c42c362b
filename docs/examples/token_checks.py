"""Token validity on bounded time: PyJWT and X.509 (the examples of docs/CLOCKBOUND.md).

Neither library takes an interval for "now", so the time is passed explicitly: PyJWT's own
time checks are turned off and the window is checked against [earliest, latest]; an X.509
chain is verified at both ends of the interval (each certificate's validity is an interval,
so valid at both ends means valid at every instant between). Tested by
tests/test_clockbound_examples.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import jwt
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from timesyncd.clockbound import BoundedClock, ClockStatus

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def decode_jwt(token: str, key: Any, clock: BoundedClock, algorithms: list[str],
               leeway_s: float = 0.0) -> dict[str, Any]:
    """Verify the signature with PyJWT, then the time window on bounded time: a token that
    may have expired is refused (``accept_possibly_expired=True`` would let it through)."""
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=algorithms,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                 "require": ["exp"]})
    starts = [claims[k] for k in ("nbf", "iat") if k in claims]
    check = clock.check_window(max(starts) if starts else None, claims["exp"],
                               leeway_s=leeway_s)
    if not check.valid:
        raise jwt.InvalidTokenError(f"token time window {check.verdict}: {check.reason}")
    return claims


def verify_server_chain(leaf: x509.Certificate, intermediates: list[x509.Certificate],
                        roots: list[x509.Certificate], server_name: str,
                        clock: BoundedClock) -> None:
    """Verify with ``cryptography`` at the earliest and at the latest possible true time
    (floored and ceiled to the microsecond ``datetime`` carries); raises if either fails."""
    t = clock.now()
    if t.status not in (ClockStatus.SYNCHRONIZED, ClockStatus.FREE_RUNNING):
        raise ValueError(f"clock status {t.status.name}: cannot check certificate validity")
    store = Store(roots)
    for us in (t.earliest_ns // 1000, -(-t.latest_ns // 1000)):
        when = _EPOCH + dt.timedelta(microseconds=us)
        verifier = PolicyBuilder().store(store).time(when).build_server_verifier(
            x509.DNSName(server_name))
        verifier.verify(leaf, intermediates)
