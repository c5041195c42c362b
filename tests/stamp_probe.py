"""Measurement-bias probe: the daemon's raw measured offsets against the clock's true offset.

A :class:`ProbeController` stands in for the real controller inside a real
:class:`GuestDaemon`, so every stamp is taken by the daemon's own code (send path, relay link,
UDP source); it sends a request every ``interval_s`` and never touches the clock. The clock is
a :class:`SoftwareClock` with no rate error, so per sample ``bias = measured offset - true
offset`` is what the stamping (and residence correction) gets wrong.

Run ``python tests/stamp_probe.py [N]`` for a table per path and event loop.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from guest_client.actions import Action, ControllerStatus, SendRequest
from guest_client.clocks import SoftwareClock
from guest_client.controller import SourceConfig
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.addresses import parse_address
from timesyncd.exchange import ClientExchange, Sample

_NS = 1_000_000_000


@dataclass
class ProbeResult:
    bias_us: list[float] = field(default_factory=list)  # measured minus true offset
    delay_us: list[float] = field(default_factory=list)  # round trip (t4 - t1) - (t3 - t2)
    path_delay_us: list[float] = field(default_factory=list)  # minus relay residence
    residence_us: list[float] = field(default_factory=list)  # r_in + r_out
    rejected: int = 0

    def summary(self) -> dict[str, float]:
        b = self.bias_us
        return {
            "n": len(b), "mean_bias_us": statistics.fmean(b),
            "median_bias_us": statistics.median(b),
            "sd_bias_us": statistics.pstdev(b), "median_delay_us": statistics.median(self.delay_us),
            "median_path_delay_us": statistics.median(self.path_delay_us),
            "median_residence_us": statistics.median(self.residence_us),
        }


class ProbeController:
    """The parts of the ``GuestController`` interface the daemon uses; samples only."""

    def __init__(self, clock: SoftwareClock, samples: int, interval_s: float,
                 warmup: int = 20) -> None:
        self.clock = clock
        self.want = samples + warmup
        self.warmup = warmup
        self.interval_ns = round(interval_s * _NS)
        self.state = "unsynchronised"
        self.updates = 0
        self.refused_jumps = 0
        self.result = ProbeResult()
        self.received = 0
        self.done = asyncio.Event()
        self._ex: dict[str, ClientExchange] = {}
        self._next: dict[str, int] = {}
        self._rng = random.Random(1)
        self._started = False
        self._t1_true: dict[str, int] = {}

    def add_source(self, source: SourceConfig, now_ns: int) -> list[Action]:
        self._ex.setdefault(source.name, ClientExchange())
        if self._started:
            self._next[source.name] = now_ns
        return []

    def remove_source(self, name: str) -> None:
        self._ex.pop(name, None)
        self._next.pop(name, None)

    def start(self, now_ns: int) -> list[Action]:
        self._started = True
        for name in self._ex:
            self._next[name] = now_ns
        return []

    def next_timer_ns(self) -> int | None:
        return min(self._next.values()) if self._next and not self.done.is_set() else None

    def drain_events(self) -> list[Any]:  # no state transitions: it only samples
        return []

    def base_frequency_ppm(self) -> tuple[float, float | None]:
        return 0.0, None  # never corrects the clock: a stop puts back nothing

    def on_timer(self, now_ns: int) -> list[Action]:
        actions: list[Action] = []
        for name, due in list(self._next.items()):
            if now_ns >= due:
                data = self._ex[name].request(self._rng.getrandbits(63) + 1, now_ns)
                self._next[name] = now_ns + self.interval_ns
                actions.append(SendRequest(name, data))
        return actions

    def on_sent(self, source: str, tx_ns: int) -> None:
        self._ex[source].sent(tx_ns)

    def on_reply(self, source: str, data: bytes, rx_ns: int, residence_in_ns: int = 0,
                 residence_out_ns: int = 0) -> list[Action]:
        true_ns = self.clock.true_offset_ns()
        s = self._ex[source].receive(data, rx_ns, residence_in_ns, residence_out_ns)
        if not isinstance(s, Sample):
            self.result.rejected += 1
            return []
        self.received += 1
        if self.received > self.warmup:  # skip connection set-up and first-use costs
            r = self.result
            r.bias_us.append((s.offset_s * _NS - true_ns) / 1e3)
            r.delay_us.append(s.delay_s * 1e6)
            r.path_delay_us.append(s.path_delay_s * 1e6)
            r.residence_us.append((residence_in_ns + residence_out_ns) / 1e3)
        if self.received >= self.want:
            self.done.set()
        return []

    def on_source_error(self, source: str, reason: str, now_ns: int) -> list[Action]:
        return []

    def on_connection_lost(self, now_ns: int,
                           sources: Iterable[str] | None = None) -> list[Action]:
        return []

    def status(self, now_ns: int) -> ControllerStatus:
        return ControllerStatus("unsynchronised", None, 0.0, None, 1.0, None, 0, 0, {}, [])


async def probe(path: str, samples: int = 200, interval_s: float = 0.01,
                upstream: str | None = None, timeout_s: float = 60.0) -> ProbeResult:
    """Bias over ``samples`` exchanges. ``path``: "relay" (in-process relay on a Unix socket,
    answering from the host clock, or forwarding to ``upstream``) or "udp" (``upstream``
    directly)."""
    tmp = tempfile.mkdtemp(prefix="ts-probe-")
    relay: RelayService | None = None
    kw: dict[str, Any] = {"clock": "software", "health_interval_s": 0.0,
                          "status_socket": os.path.join(tmp, "guest.sock")}
    if path == "relay":
        sock = os.path.join(tmp, "relay.sock")
        relay = RelayService(RelaySettings(
            listen=(f"unix:{sock}",), upstreams=(upstream,) if upstream else (),
            rate_limit=10_000.0, rate_burst=10_000))
        await relay.start()
        kw["relay"] = f"unix:{sock}"
    else:
        assert upstream is not None
        kw["servers"] = (upstream,)
    clock = SoftwareClock(0.0, 0.0)
    controller = ProbeController(clock, samples, interval_s)
    for spec in kw.get("servers", ()):  # the daemon adds these only to a controller it builds
        controller.add_source(SourceConfig(str(parse_address(spec))), clock.now_ns())
    daemon = GuestDaemon(GuestSettings(**kw), clock, rng=random.Random(7),
                         controller=controller)  # type: ignore[arg-type]
    await daemon.start()
    try:
        async with asyncio.timeout(timeout_s):
            await controller.done.wait()
    finally:
        await daemon.stop()
        if relay is not None:
            await relay.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not clock.steps and clock.correction_ppm == 0.0
    return controller.result


def run(coro_fn: Callable[[], Any], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


def main(n: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from chrony_fixture import chronyd

    with chronyd() as server:
        for loop in ("asyncio", "uvloop"):
            for label, path, up in (("relay->host clock", "relay", None),
                                    ("relay->chronyd", "relay", server.address),
                                    ("udp->chronyd", "udp", server.address)):
                res = run(lambda p=path, u=up: probe(p, n, upstream=u), loop)
                s = res.summary()
                print(f"{loop:8} {label:18} n={s['n']:4} bias mean {s['mean_bias_us']:+7.1f} us "
                      f"median {s['median_bias_us']:+7.1f} sd {s['sd_bias_us']:6.1f}  "
                      f"delay {s['median_delay_us']:7.1f} path {s['median_path_delay_us']:7.1f} "
                      f"residence {s['median_residence_us']:6.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
