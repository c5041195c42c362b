"""Two clocks read at one instant, as nearly as a preemptible process can.

Read back to back, a preemption between the two reads (on a busy 2-vCPU machine 1 read in
14,000 idle, tens of microseconds to milliseconds: ``bench/truth_read.py``) is that much error
in their difference. So the second clock is read between two reads of the first, compared at
their midpoint, and read again while the bracket is wide: the error is at most half the
bracket, which is reported so a caller that needs a bound can refuse a wide one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: A bracket this tight is taken at once (its error is at most half of it) ...
TIGHT_NS = 4_000
#: ... else the tightest of this many tries.
TRIES = 8


@dataclass(frozen=True, slots=True)
class PairedRead:
    """``first_ns`` (the bracket's midpoint) and ``second_ns`` at the same instant, within
    ``spread_ns / 2``."""

    first_ns: int
    second_ns: int
    spread_ns: int

    @property
    def difference_ns(self) -> int:
        """second - first."""
        return self.second_ns - self.first_ns


def read_pair(first: Callable[[], int], second: Callable[[], int], *,
              tight_ns: int = TIGHT_NS, tries: int = TRIES) -> PairedRead:
    """Read ``second`` bracketed by two reads of ``first``; retry while the bracket is wider
    than ``tight_ns`` (at most ``tries`` times) and keep the tightest."""
    best: PairedRead | None = None
    for _ in range(max(tries, 1)):
        before = first()
        value = second()
        after = first()
        spread = after - before
        if best is None or spread < best.spread_ns:
            best = PairedRead(before + spread // 2, value, spread)
        if spread <= tight_ns:
            break
    assert best is not None
    return best
