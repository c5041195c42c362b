"""A guest controller on a simulated clock and network (the simulator's engine), for tests of
the controller's behaviour in virtual time."""

from __future__ import annotations

import random
from collections.abc import Callable

from guest_client.controller import GuestController, SourceConfig
from sim.clock import SimClock
from sim.engine import Engine, Upstream
from sim.network import Hop, Network
from sim.oscillator import Oscillator
from timesyncd.discipline import DisciplineConfig

#: 2025-01-01T00:00:00Z, Unix ns: where simulated clocks start
START = 1_735_689_600 * 1_000_000_000
#: a quiet LAN path: 100 us base one-way delay, 50 us jitter
LAN = Network(upstream=Hop(base_s=100e-6, jitter_s=50e-6))


def make_guest(upstreams: list[Upstream], *, seed: int = 1, offset_s: float = 0.0,
               ppm: float = 0.0, extra_ppm: Callable[[float], float] | None = None,
               sources: list[SourceConfig] | None = None, **cfg: object
               ) -> tuple[Engine, SimClock, GuestController]:
    """(engine, clock, controller): a clock ``offset_s`` off running ``ppm`` fast (plus
    ``extra_ppm(t)``), disciplined by a controller with ``DisciplineConfig(**cfg)``; one seed
    fixes the oscillator's wander, the controller's and the network's randomness."""
    rng = random.Random(seed)
    osc = Oscillator(ppm, 1e-3, random.Random(rng.getrandbits(32)), extra_ppm=extra_ppm)
    clock = SimClock(osc, start_unix_ns=START, initial_offset_s=offset_s)
    ctl = GuestController(DisciplineConfig(**cfg), random.Random(rng.getrandbits(32)),  # type: ignore[arg-type]
                          sources or [])
    return Engine(ctl, clock, upstreams, random.Random(rng.getrandbits(32))), clock, ctl


def watch_offsets(engine: Engine, clock: SimClock, ctl: GuestController, first_s: int,
                  last_s: int, each: Callable[[], None] | None = None) -> tuple[list[float], int]:
    """(true offset each second from ``first_s`` to ``last_s``, seconds the reported bound did
    not cover it); ``each`` runs after every second, for a test's own bookkeeping."""
    offs, outside = [], 0
    for t in range(first_s, last_s + 1):
        engine.run(float(t))
        st = ctl.status(clock.now_ns())
        true = clock.offset_s()
        offs.append(true)
        if st.error_bound_s is None or abs(true) > st.error_bound_s:
            outside += 1
        if each is not None:
            each()
    return offs, outside
