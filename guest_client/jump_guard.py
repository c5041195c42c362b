"""The jump guard: after the initial updates, a large jump is refused unless confirmed.

A hostile or broken host can report any time it likes; a restored snapshot or a long pause
really does move the guest's clock. Telling the two apart takes enough agreeing samples, from
more than one source where there are several, and a reason to believe the guest moved: a
discontinuity on our side (the relay link dropped, a long silence) or sources the host
cannot forge (authenticated, NTS). Where authenticated sources are configured, only they can
confirm: the host controls the relay link, so a discontinuity it can cause (dropping the link
while the authenticated sources ride on it) must not let its own sources step the clock.
Pure functions over the sources' refused jumps.
"""

from __future__ import annotations

from collections.abc import Iterable

from guest_client.source import Source


def jump_confirmed(sources: Iterable[Source], confirm_samples: int, tolerance_s: float,
                   discontinuity: bool) -> bool:
    """Whether the consecutive jumps the sources reported confirm that the guest moved."""
    sources = list(sources)
    confirming = [s for s in sources if s.jumps]
    jumps = [j for s in confirming for j in s.jumps]
    if len(jumps) < confirm_samples or max(jumps) - min(jumps) > tolerance_s:
        return False
    usable = [s for s in sources if not s.disabled and s.reach]
    if len(usable) > 1 and len(confirming) < 2:
        return False
    if any(s.config.trust == "authenticated" and not s.disabled for s in sources):
        # every reachable authenticated source agrees, and there is one (host sources may
        # agree too: a restored snapshot moves the guest against all of them)
        auth = [s for s in usable if s.config.trust == "authenticated"]
        return bool(auth) and all(s.jumps for s in auth)
    return discontinuity


def confirmed_jump(sources: Iterable[Source]) -> float:
    """Size of a confirmed jump: the median reported; when authenticated sources confirmed
    it they alone size it, since the host cannot forge them."""
    sources = list(sources)
    jumps = sorted([j for s in sources if s.config.trust == "authenticated" for j in s.jumps]
                   or [j for s in sources for j in s.jumps])
    return jumps[len(jumps) // 2]
