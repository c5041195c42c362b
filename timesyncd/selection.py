"""Source selection: intersection algorithm (falsetickers out) and combination of survivors.

Each candidate claims the true time lies within ``offset +- distance``. Marzullo's
intersection (RFC 5905 section 11.2.1) finds the interval that most candidates agree on;
those whose interval misses it are falsetickers. Survivors are averaged with weights
``1/distance**2`` so tight sources dominate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    offset: float  # uncorrected clock minus this source, at the common evaluation time
    slope: float
    distance: float  # half-width of the interval that contains the truth (root distance + sd)
    leap: int = 0


@dataclass(frozen=True, slots=True)
class Selection:
    selected: tuple[str, ...]
    falsetickers: tuple[str, ...]
    offset: float
    slope: float
    distance: float  # half-width around ``offset`` that covers the majority's intersection
    leap: int


def select(candidates: Sequence[Candidate]) -> Selection | None:
    """Pick the truechimers (a strict majority must agree) and combine them; None if no
    majority exists (the caller keeps its previous estimate)."""
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        c = candidates[0]
        return Selection((c.name,), (), c.offset, c.slope, c.distance, c.leap)
    edges: list[tuple[float, int]] = []
    for c in candidates:
        edges.append((c.offset - c.distance, -1))  # interval opens (sorted before closes)
        edges.append((c.offset + c.distance, +1))
    edges.sort()
    best = depth = 0
    lo = hi = 0.0
    for i, (value, kind) in enumerate(edges):
        depth -= kind
        if depth > best:
            best = depth
            lo = value
            hi = edges[i + 1][0]
    if best * 2 <= n:
        return None
    chosen = [c for c in candidates if c.offset - c.distance <= hi and c.offset + c.distance >= lo]
    false = tuple(c.name for c in candidates if c not in chosen)
    weights = [1.0 / max(c.distance, 1e-9) ** 2 for c in chosen]
    total = sum(weights)
    offset = sum(w * c.offset for w, c in zip(weights, chosen, strict=True)) / total
    slope = sum(w * c.slope for w, c in zip(weights, chosen, strict=True)) / total
    # the truth lies where the majority's intervals meet, [lo, hi]: the combined offset's
    # distance must reach both ends (the minimum over truechimers did not, once the
    # weighted mean moved away from the tightest one)
    distance = max(offset - lo, hi - offset, 0.0)
    leaps = [c.leap for c in chosen]
    top = max(set(leaps), key=leaps.count)
    leap = top if leaps.count(top) * 2 > len(leaps) else 0
    return Selection(tuple(c.name for c in chosen), false, offset, slope, distance, leap)
