"""Shared rig for the loopback guest benches: an in-process relay on a Unix socket (never vsock),
an in-process ``GuestDaemon`` on a ``SoftwareClock`` (which knows its true offset), and a
sampler of what the guest says against the truth.

Importing this module puts the repository root and ``tests/`` on ``sys.path`` if they are not
there yet; a bench still puts them first itself, before importing ``timesyncd`` or the tests'
fixtures (an installed ``timesync`` may point at another checkout).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from guest_client.clocks import SoftwareClock  # noqa: E402
from guest_client.daemon import GuestDaemon  # noqa: E402
from host_relay.service import RelayService  # noqa: E402
from host_relay.settings import RelaySettings  # noqa: E402

_NS = 1_000_000_000


async def start_relay(upstream: str, sock: str) -> RelayService:
    """A relay listening on ``unix:sock`` for ``upstream``, rate limits out of the way."""
    relay = RelayService(RelaySettings(upstreams=(upstream,), listen=(f"unix:{sock}",),
                                       rate_limit=1000.0, rate_burst=1000))
    await relay.start()
    return relay


async def wait_synchronised(daemon: GuestDaemon, clock: SoftwareClock, timeout_s: float,
                            within_ns: int = 100_000) -> bool:
    """Wait (bounded) until the guest says synchronised and is truly within ``within_ns``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (daemon.status()["state"] == "synchronised"
                and abs(clock.true_offset_ns()) < within_ns):
            return True
        await asyncio.sleep(0.1)
    return False


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the sampler started
    phase: str
    state: str
    true_s: float  # |clock reading - reference|
    bound_s: float  # error_bound_s (16 s: no bound yet)
    raw_true_s: float  # against ``raw_reference_ns`` (see Sampler)


@dataclass
class Coverage:
    """What the samples say: the share with |true| <= bound, overall and while synchronised."""

    samples: int = 0
    covered: int = 0
    synced: int = 0
    synced_outside: int = 0
    worst_ratio: float = 0.0
    outside: list[Sample] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        return self.covered / self.samples if self.samples else 0.0

    raw_covered: int = 0

    @property
    def raw_coverage(self) -> float:
        return self.raw_covered / self.samples if self.samples else 0.0

    @classmethod
    def of(cls, rows: list[Sample]) -> Coverage:
        c = cls()
        for r in rows:
            c.samples += 1
            ok = r.true_s <= r.bound_s
            c.covered += ok
            c.raw_covered += r.raw_true_s <= r.bound_s
            if not ok:
                c.outside.append(r)
            if r.state == "synchronised":
                c.synced += 1
                c.synced_outside += not ok
            if r.bound_s > 0:
                c.worst_ratio = max(c.worst_ratio, r.true_s / r.bound_s)
        return c


class Sampler:
    """Reads the guest's status every ``every_s`` (a task on the running loop, bounded by
    ``max_s``): state, ``error_bound_s`` and |true offset| against ``reference_ns()``, the
    time the guest is configured to trust minus the machine's clock (0 for an honest one).
    ``raw_reference_ns`` (default: the same) is kept beside it, for an upstream whose time
    moves before any reply shows the move."""

    def __init__(self, daemon: GuestDaemon, clock: SoftwareClock, every_s: float = 0.2,
                 max_s: float = 900.0, reference_ns: Callable[[], int] = lambda: 0,
                 raw_reference_ns: Callable[[], int] | None = None) -> None:
        self.daemon, self.clock, self.every_s, self.max_s = daemon, clock, every_s, max_s
        self.reference_ns = reference_ns
        self.raw_reference_ns = raw_reference_ns or reference_ns
        self.phase = "start"
        self.rows: list[Sample] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    def sample(self) -> Sample:
        st = self.daemon.status_report()  # bound and true offset read at one clock reading
        true_s = self.clock.true_offset_ns() / _NS if st.true_offset_s is None else st.true_offset_s
        true = abs(true_s - self.reference_ns() / _NS)
        raw = abs(true_s - self.raw_reference_ns() / _NS)
        bound = st.error_bound_s
        row = Sample(time.monotonic() - self._t0, self.phase, st.state, true,
                     16.0 if bound is None else bound, raw)
        self.rows.append(row)
        return row

    async def _run(self) -> None:
        while time.monotonic() - self._t0 < self.max_s:
            self.sample()
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> Coverage:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return Coverage.of(self.rows)
