"""Network model: guest -> vsock hop -> relay -> upstream hop -> server, and back.

Each :class:`Hop` has a base one-way delay, jitter (exponential with the given mean, or
normal with the given sigma, truncated at zero), asymmetry (extra delay on the way out,
guest -> server), loss, outage windows (true seconds) and optional load-dependent queueing
(``load(true_s)`` -> utilisation; mean extra delay ``queue_s * utilisation``, exponential).
The relay's residence time (``residence_s`` mean, exponential) is reported to the guest
exactly, as the real relay measures it.

Host CPU load (:class:`HostSched`, issue 18): with the host busy, every process wake-up on the
path waits for a CPU (``sched_s * utilisation`` mean, exponential): the relay reading a
request, the relay reading the upstream's reply, the guest's vCPU reading that reply. No one
can stamp the first and the last (stream sockets have no receive stamps), so they stay path
delay; the middle one the real relay stamps in the kernel (``kernel_stamps``), so it is
residence the guest removes. Without kernel stamps it is path delay on the way back only,
and every offset is biased by half of it.
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
class HostSched:
    """Scheduling waits on a loaded host: ``load(true_s)`` -> CPU utilisation."""

    load: Callable[[float], float]
    sched_s: float
    kernel_stamps: bool = True

    def wait(self, true_s: float, rng: random.Random) -> float:
        mean = self.sched_s * max(self.load(true_s), 0.0)
        return rng.expovariate(1.0 / mean) if mean > 0 else 0.0


@dataclass(frozen=True)
class Network:
    """The path of one upstream: ``vsock`` (guest <-> relay) and ``upstream`` (relay <-> server)."""

    vsock: Hop = Hop()
    upstream: Hop = Hop()
    residence_s: float = 0.0
    host: HostSched | None = None

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
        host = self.host
        if host is not None:  # the relay's wake-up: hidden for requests, stamped for replies
            wake = host.wait(true_s + d1, rng)
            if outbound or not host.kernel_stamps:
                d1 += wake
            else:
                r += wake
        d2 = second.one_way(true_s + d1 + r, rng, outbound)
        if d2 is None:
            return None
        if host is not None and not outbound:  # the guest's vCPU waking to read the reply
            d2 += host.wait(true_s + d1 + r + d2, rng)
        return true_s + d1 + r + d2, r
