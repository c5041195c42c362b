"""Time-sensitive tokens issued on true time and validated on the guest's clock.

An outside party (identity provider, CA, authenticator app) issues tokens at true time; each one
reaches the guest ``transit_s`` later and is validated against the guest clock. Three kinds:

* ``jwt``: RFC 7519 ``iat``/``nbf`` (integer seconds, floor of the issue time) and ``exp``,
  checked exactly as PyJWT does: rejected if ``iat > now + leeway`` or ``nbf > now + leeway``
  ("not yet valid": a clock that is *behind* fails here) or ``exp <= now - leeway``.
* ``x509``: a freshly issued short-lived certificate, ``notBefore = floor(issue) - backdate``,
  ``notAfter = notBefore + lifetime`` (whole seconds, as DER times are), valid iff
  ``notBefore <= now <= notAfter`` (RFC 5280: inclusive).
* ``totp``: RFC 6238, 30 s step, accepted iff the validator's counter is within +-window of the
  issuer's.

The validator's clock resolution is one microsecond (Python ``datetime``, which PyJWT and
``cryptography`` use), so guest readings are floored to microseconds before comparison.

Each token is also *replayed* once, ``replay_after_s`` after the first instant a correct clock
refuses it (JWT: ``exp + leeway``; X.509: just after ``notAfter``; TOTP: when the issuer's counter
leaves the window). Acceptance of that replay is an expired token wrongly accepted: the replay
window a slow clock opens.

Counting is exact per token but vectorised: the strategy supplies the guest clock's offset at
every validation and replay instant (:meth:`TokenSchedule.query_times_ns`), and
:meth:`TokenSchedule.tally` compares integer microseconds, the same arithmetic as the scalar
validators below (which the freezegun tests check against real PyJWT and ``cryptography``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

KINDS: tuple[str, ...] = ("jwt", "x509", "totp")
NS = 1_000_000_000
US = 1_000

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class TokenConfig:
    """Token traffic and validator settings. Defaults: see docs/SIMULATOR.md."""

    rate_per_s: float = field(default=1.0 / 60.0,
                              metadata={"help": "tokens issued per second, per kind"})
    transit_s: float = field(default=0.02, metadata={"help": "issue-to-validation delay, seconds"})
    jwt_leeway_s: float = field(default=3.0,
                                metadata={"help": "JWT leeway, seconds (PyJWT default 0)"})
    jwt_lifetime_s: int = field(default=300, metadata={"help": "JWT exp - iat, seconds"})
    x509_backdate_s: int = field(default=30, metadata={"help": "notBefore backdate, seconds"})
    x509_lifetime_s: int = field(default=3600, metadata={"help": "notAfter - notBefore, seconds"})
    totp_step_s: int = field(default=30, metadata={"help": "TOTP time step, seconds (RFC 6238)"})
    totp_window: int = field(default=1, metadata={"help": "TOTP accepted steps either side"})
    replay_after_s: float = field(default=1.0, metadata={
        "help": "each token is replayed this long after a correct clock first refuses it"})
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"tokens: unknown kind {kind!r}; use {', '.join(KINDS)}")
        if self.rate_per_s < 0 or self.transit_s < 0 or self.jwt_leeway_s < 0:
            raise ValueError("tokens: rate, transit and leeway must be >= 0")
        if self.totp_step_s <= 0 or self.totp_window < 0 or self.replay_after_s <= 0:
            raise ValueError("tokens: totp step > 0, window >= 0 and replay_after_s > 0 required")


# --- scalar validators: the reference semantics (ints in, bool out) --------------------------

def jwt_claims(issue_ns: int, lifetime_s: int) -> tuple[int, int, int]:
    """(iat, nbf, exp) of a JWT minted at true time ``issue_ns`` (iat is an integer second)."""
    iat = issue_ns // NS
    return iat, iat, iat + lifetime_s


def jwt_accepts(iat: int, nbf: int, exp: int, now_ns: int, leeway_s: float) -> bool:
    """PyJWT's iat/nbf/exp checks at clock reading ``now_ns``."""
    now_us, lw_us = now_ns // US, round(leeway_s * 1e6)
    return iat * 10**6 <= now_us + lw_us and nbf * 10**6 <= now_us + lw_us and (
        exp * 10**6 > now_us - lw_us)


def x509_validity(issue_ns: int, backdate_s: int, lifetime_s: int) -> tuple[int, int]:
    """(notBefore, notAfter) in Unix seconds of a certificate issued at ``issue_ns``."""
    not_before = issue_ns // NS - backdate_s
    return not_before, not_before + lifetime_s


def x509_accepts(not_before: int, not_after: int, now_ns: int) -> bool:
    now_us = now_ns // US
    return not_before * 10**6 <= now_us <= not_after * 10**6


def totp_counter(t_ns: int, step_s: int = 30) -> int:
    return t_ns // (step_s * NS)


def totp_accepts(issued_counter: int, now_ns: int, step_s: int = 30, window: int = 1) -> bool:
    # floor to microseconds first: same counter, as the step is a whole number of microseconds
    return abs((now_ns // US) // (step_s * 10**6) - issued_counter) <= window


# --- vectorised schedule and tally -----------------------------------------------------------

@dataclass(frozen=True)
class KindSchedule:
    """Issue instants (true Unix ns) of one kind's tokens; validation and replay instants and
    the claims follow from them and the config, computed on use (a year of three kinds is
    1.6 M tokens: five stored arrays each would be ~60 MB)."""

    kind: str
    issue_ns: IntArray
    config: TokenConfig

    @property
    def validate_ns(self) -> IntArray:
        return self.issue_ns + round(self.config.transit_s * NS)

    @property
    def lo(self) -> IntArray:
        """Lower claim, whole seconds (jwt: iat/nbf; x509: notBefore; totp: counter)."""
        c, secs = self.config, self.issue_ns // NS
        if self.kind == "jwt":
            return secs
        if self.kind == "x509":
            return secs - c.x509_backdate_s
        return self.issue_ns // (c.totp_step_s * NS)

    @property
    def hi(self) -> IntArray:
        """Upper claim (jwt: exp; x509: notAfter; totp: the counter again)."""
        c = self.config
        if self.kind == "jwt":
            return self.issue_ns // NS + c.jwt_lifetime_s
        if self.kind == "x509":
            return self.issue_ns // NS - c.x509_backdate_s + c.x509_lifetime_s
        return self.lo

    @property
    def replay_ns(self) -> IntArray:
        """Each token again, ``replay_after_s`` after a correct clock first refuses it."""
        c = self.config
        if self.kind == "jwt":
            refused_from = self.hi * NS + round(c.jwt_leeway_s * 1e6) * US
        elif self.kind == "x509":
            refused_from = self.hi * NS + US  # first microsecond after notAfter
        else:
            refused_from = (self.lo + c.totp_window + 1) * (c.totp_step_s * NS)
        return refused_from + round(c.replay_after_s * NS)


@dataclass
class KindTally:
    """Outcome for one kind; times are true seconds since the start of the run."""

    issued: int = 0
    rejected: int = 0  # valid tokens wrongly rejected
    accepted_expired: int = 0  # replays of expired tokens wrongly accepted
    rejection_times_s: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.zeros(0))

    @property
    def first_rejection_s(self) -> float | None:
        return float(self.rejection_times_s[0]) if len(self.rejection_times_s) else None


class TokenSchedule:
    """All tokens of a run, drawn once from the seed so every strategy sees the same ones."""

    def __init__(self, config: TokenConfig, start_ns: int, duration_s: float, seed: int) -> None:
        self.config = config
        self.start_ns = start_ns
        self.end_ns = start_ns + round(duration_s * NS)
        rng = np.random.default_rng([seed, 0x70CE])
        self.kinds: dict[str, KindSchedule] = {}
        for kind in config.kinds:
            self.kinds[kind] = self._draw(kind, rng, duration_s)

    def _draw(self, kind: str, rng: np.random.Generator, duration_s: float) -> KindSchedule:
        c = self.config
        n = int(duration_s * c.rate_per_s)
        period_ns = NS / c.rate_per_s if c.rate_per_s > 0 else 0.0
        # one token at a uniformly random instant of each period: fractional seconds matter
        frac = rng.random(n)
        issue = self.start_ns + ((np.arange(n) + frac) * period_ns).astype(np.int64)
        keep = issue + round(c.transit_s * NS) <= self.end_ns  # validated within the run
        return KindSchedule(kind, issue[keep], c)

    def last_query_ns(self) -> int | None:
        """The latest instant of :meth:`query_times_ns`, without building them all."""
        last = [int(t[t <= self.end_ns].max()) for k in self.kinds.values()
                for t in (k.validate_ns, k.replay_ns) if (t <= self.end_ns).any()]
        return max(last) if last else None

    def query_times_ns(self) -> IntArray:
        """Every instant (true Unix ns, sorted, unique) at which the guest clock must be read."""
        parts = [np.concatenate([k.validate_ns, k.replay_ns]) for k in self.kinds.values()]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        times = np.unique(np.concatenate(parts))
        return times[times <= self.end_ns]

    def accepts(self, kind: str, sched_lo: IntArray, sched_hi: IntArray,
                now_ns: IntArray) -> BoolArray:
        """Vectorised validator, bit-for-bit the scalar ones above."""
        c = self.config
        now_us = now_ns // US
        if kind == "jwt":
            lw = round(c.jwt_leeway_s * 1e6)
            return (sched_lo * 10**6 <= now_us + lw) & (sched_hi * 10**6 > now_us - lw)
        if kind == "x509":
            return (sched_lo * 10**6 <= now_us) & (now_us <= sched_hi * 10**6)
        counter = now_us // (c.totp_step_s * 10**6)
        return np.abs(counter - sched_lo) <= c.totp_window

    def tally(self, offset_at: Callable[[IntArray], IntArray]) -> dict[str, KindTally]:
        """Validate every token (and its replay) at guest time = true time + offset;
        ``offset_at`` maps true Unix ns to the guest's offset in ns (e.g. an
        :class:`OffsetLookup`)."""
        result: dict[str, KindTally] = {}
        for kind, k in self.kinds.items():
            t = KindTally(issued=len(k.issue_ns))
            times = []
            for i in range(0, len(k.issue_ns), self.CHUNK):  # bounded temporaries
                part = KindSchedule(kind, k.issue_ns[i:i + self.CHUNK], k.config)
                rejected, expired_accepted = self._tally_part(part, offset_at)
                times.append(rejected)
                t.accepted_expired += expired_accepted
            if times:
                t.rejection_times_s = np.concatenate(times)
            t.rejected = len(t.rejection_times_s)
            result[kind] = t
        return result

    #: tokens checked at once; the arithmetic is per token, so chunking changes nothing
    CHUNK = 1 << 16

    def _tally_part(self, k: KindSchedule, offset_at: Callable[[IntArray], IntArray]
                    ) -> tuple[npt.NDArray[np.float64], int]:
        """(rejection times, expired replays accepted) of some of one kind's tokens."""
        kind = k.kind
        validate_ns, lo, hi = k.validate_ns, k.lo, k.hi
        ok_true = self.accepts(kind, lo, hi, validate_ns)
        ok_guest = self.accepts(kind, lo, hi, validate_ns + offset_at(validate_ns))
        wrong = ok_true & ~ok_guest
        rejection_times_s = (validate_ns[wrong] - self.start_ns) / NS
        replay_ns = k.replay_ns
        live = replay_ns <= self.end_ns
        r_ns, lo, hi = replay_ns[live], lo[live], hi[live]
        refused_true = ~self.accepts(kind, lo, hi, r_ns)
        accepted_guest = self.accepts(kind, lo, hi, r_ns + offset_at(r_ns))
        return rejection_times_s, int((refused_true & accepted_guest).sum())


class OffsetLookup:
    """Guest offsets (ns) at the schedule's query instants, looked up by instant."""

    def __init__(self, times_ns: IntArray, offsets_ns: IntArray) -> None:
        if len(times_ns) != len(offsets_ns):
            raise ValueError("offsets must match query times")
        self.times_ns = times_ns
        self.offsets_ns = offsets_ns.astype(np.int64)

    def __call__(self, at_ns: IntArray) -> IntArray:
        idx = np.searchsorted(self.times_ns, at_ns)
        if len(at_ns) and (idx.max(initial=0) >= len(self.times_ns)
                           or not np.array_equal(self.times_ns[idx], at_ns)):
            raise KeyError("offset requested at an instant that was not queried")
        return self.offsets_ns[idx]
