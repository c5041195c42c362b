"""Trust bounds: host-trusted sources may only move the clock where authenticated ones allow.

In the enclave threat model the host can forge any unauthenticated NTP reply. When the guest
also has authenticated (NTS) sources, the truth lies within the interval their samples claim
(offset +- root distance, which includes half the measured round trip). A host-trusted source
is then only usable while its offset lies inside that interval; otherwise it is dropped for
the update with a named reason. With authenticated sources configured but none usable right
now, host sources are not used at all: otherwise a host could block NTS to downgrade the guest
to time it forges. Sans-IO and pure.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from timesyncd.reasons import TrustReason
from timesyncd.selection import Candidate, select

#: Reasons a host-trusted candidate is dropped (stable counter keys).
NO_AUTHENTICATED_BOUND = "no_authenticated_bound"
OUTSIDE_AUTHENTICATED_BOUNDS = TrustReason.OUTSIDE_AUTHENTICATED_BOUNDS


@dataclass(frozen=True)
class TrustBound:
    kept: tuple[Candidate, ...]
    #: dropped host-trusted candidates: name -> reason
    rejected: dict[str, str] = field(default_factory=dict)
    #: the interval the authenticated candidates allow (None when there is none)
    low: float | None = None
    high: float | None = None


def bound_by_authenticated(candidates: Sequence[Candidate],
                           authenticated: Collection[str]) -> TrustBound:
    """Keep authenticated candidates and the host ones inside their interval.

    ``authenticated`` names the sources configured as authenticated; if it is empty every
    candidate is kept (no authenticated sources configured: nothing to bound by).
    """
    if not authenticated:
        return TrustBound(tuple(candidates))
    auth = [c for c in candidates if c.name in authenticated]
    host = [c for c in candidates if c.name not in authenticated]
    sel = select(auth)
    if sel is None:
        return TrustBound(tuple(auth), dict.fromkeys((c.name for c in host),
                                                     NO_AUTHENTICATED_BOUND))
    chosen = [c for c in auth if c.name in sel.selected]
    low = max(c.offset - c.distance for c in chosen)
    high = min(c.offset + c.distance for c in chosen)
    if low > high:  # truechimers that overlap the consensus but not each other
        low, high = sel.offset - sel.distance, sel.offset + sel.distance
    kept = list(auth)
    rejected: dict[str, str] = {}
    for c in host:
        if low <= c.offset <= high:
            kept.append(c)
        else:
            rejected[c.name] = OUTSIDE_AUTHENTICATED_BOUNDS
    return TrustBound(tuple(kept), rejected, low, high)
