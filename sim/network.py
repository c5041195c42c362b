"""Network model: guest -> vsock hop -> relay -> upstream hop -> server, and back.

Each :class:`Hop` has a base one-way delay, jitter (exponential with the given mean, or
normal with the given sigma, truncated at zero), asymmetry (extra delay on the way out,
guest -> server), loss, outage windows (true seconds) and optional load-dependent queueing
(``load(true_s)`` -> utilisation; mean extra delay ``queue_s * utilisation``, exponential).
The relay's residence time (``residence_s`` mean, exponential) is reported to the guest
exactly, as the real relay measures it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hop:
    base_s: float = 0.0
    jitter_s: float = 0.0
    jitter: str = "exponential"  # or "normal"
    asymmetry_s: float = 0.0
    loss: float = 0.0
    outages: tuple[tuple[float, float], ...] = ()  # (start_s, duration_s)
    load: Callable[[float], float] | None = None
    queue_s: float = 0.0

    def down(self, true_s: float) -> bool:
        return any(start <= true_s < start + dur for start, dur in self.outages)

    def one_way(self, true_s: float, rng: random.Random, outbound: bool) -> float | None:
        """Delay of one traversal starting at ``true_s``; None when the packet is lost."""
        if (self.outages and self.down(true_s)) or (self.loss > 0 and rng.random() < self.loss):
            return None
        delay = self.base_s + (self.asymmetry_s if outbound else 0.0)
        if self.jitter_s > 0:
            if self.jitter == "normal":
                delay += max(rng.gauss(0.0, self.jitter_s), -delay)
            else:
                delay += rng.expovariate(1.0 / self.jitter_s)
        if self.load is not None and self.queue_s > 0:
            mean = self.queue_s * max(self.load(true_s), 0.0)
            if mean > 0:
                delay += rng.expovariate(1.0 / mean)
        return delay


@dataclass(frozen=True)
class Network:
    """The path of one upstream: ``vsock`` (guest <-> relay) and ``upstream`` (relay <-> server)."""

    vsock: Hop = Hop()
    upstream: Hop = Hop()
    residence_s: float = 0.0

    def _residence(self, rng: random.Random) -> float:
        return rng.expovariate(1.0 / self.residence_s) if self.residence_s > 0 else 0.0

    def request(self, true_s: float, rng: random.Random) -> tuple[float, float] | None:
        """(arrival time at the server, relay residence) for a request sent at ``true_s``."""
        return self._through_relay(self.vsock, self.upstream, True, true_s, rng)

    def reply(self, true_s: float, rng: random.Random) -> tuple[float, float] | None:
        """(arrival time at the guest, relay residence) for a reply sent at ``true_s``."""
        return self._through_relay(self.upstream, self.vsock, False, true_s, rng)

    def _through_relay(self, first: Hop, second: Hop, outbound: bool, true_s: float,
                       rng: random.Random) -> tuple[float, float] | None:
        """Cross ``first``, wait in the relay, cross ``second``; None if either hop drops it."""
        d1 = first.one_way(true_s, rng, outbound)
        if d1 is None:
            return None
        r = self._residence(rng)
        d2 = second.one_way(true_s + d1 + r, rng, outbound)
        if d2 is None:
            return None
        return true_s + d1 + r + d2, r
