"""End to end: real chronyd -> relay (unix socket) -> guest daemon disciplining a SoftwareClock.

The software clock starts 0.5 s ahead and runs 200 ppm fast; the ground truth is the machine's
CLOCK_REALTIME, which chronyd -x (local stratum) serves. Nothing here writes the real clock.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chrony_fixture import ChronyServer, chrony_server  # noqa: F401 - pytest fixture

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings

pytestmark = pytest.mark.timeout(120)

FREQ_PPM = 200.0
OFFSET_S = 0.5
CONVERGE_WITHIN_S = 40.0
HOLD_S = 5.0


class RecordingClock(SoftwareClock):
    """Remembers, for every step, how many clock updates the controller had made by then."""

    updates: Callable[[], int] = staticmethod(lambda: -1)  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_at_update: list[int] = []

    def step(self, offset_ns: int) -> None:
        self.step_at_update.append(self.updates())
        super().step(offset_ns)


class LyingProxy(asyncio.DatagramProtocol):
    """A UDP upstream in front of chronyd that, once ``shift_s`` is set, adds it to the
    server's receive and transmit timestamps (a host-side attacker moving guest time)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.shift_s = 0.0
        self.transport: asyncio.DatagramTransport | None = None
        self._clients: dict[bytes, tuple[str, int]] = {}
        self.lied = 0

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        assert self.transport is not None
        port = self.transport.get_extra_info("sockname")[1]
        return f"udp:127.0.0.1:{port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        if tuple(addr) != self.target:  # a request: remember who asked, by its cookie
            if len(data) >= 48 and len(self._clients) < 1024:
                self._clients[data[40:48]] = addr
                self.transport.sendto(data, self.target)
            return
        client = self._clients.pop(data[24:32], None)
        if client is None or len(data) < 48:
            return
        if self.shift_s:
            shift = int(self.shift_s * (1 << 32))
            buf = bytearray(data)
            for off in (32, 40):  # receive, transmit timestamps
                ts = int.from_bytes(buf[off:off + 8], "big") + shift
                buf[off:off + 8] = (ts % (1 << 64)).to_bytes(8, "big")
            data = bytes(buf)
            self.lied += 1
        self.transport.sendto(data, client)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Trace:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (elapsed, true offset)
    converged_at: float | None = None


async def run_guest(tmp_path: Path, relay_settings: RelaySettings,
                    until: Callable[[GuestDaemon, Trace], bool], timeout_s: float,
                    on_tick: Callable[[GuestDaemon, Trace], None] | None = None,
                    ) -> tuple[GuestDaemon, RecordingClock, Trace]:
    sock = os.path.join(tmp_path, "relay.sock")
    relay = RelayService(RelaySettings(**{**relay_settings.__dict__, "listen": (f"unix:{sock}",)}))
    await relay.start()
    try:
        clock = RecordingClock(FREQ_PPM, OFFSET_S)
        settings = GuestSettings(relay=f"unix:{sock}", clock="software",
                                 software_freq_ppm=FREQ_PPM, software_offset_s=OFFSET_S,
                                 status_socket=os.path.join(tmp_path, "g.sock"),
                                 minpoll=0, maxpoll=1, name="e2e-guest")
        daemon = GuestDaemon(settings, clock, rng=random.Random(42))
        clock.updates = lambda: daemon.controller.updates  # type: ignore[method-assign]
        trace = Trace()
        start = time.monotonic()
        await daemon.start()
        try:
            while time.monotonic() - start < timeout_s:
                elapsed = time.monotonic() - start
                true = clock.true_offset_ns() / 1e9
                trace.samples.append((elapsed, true))
                if abs(true) >= 1e-3:
                    trace.converged_at = None
                elif trace.converged_at is None:
                    trace.converged_at = elapsed
                if on_tick is not None:
                    on_tick(daemon, trace)
                if until(daemon, trace):
                    break
                await asyncio.sleep(0.05)
        finally:
            await daemon.stop()
    finally:
        await relay.stop()
    return daemon, clock, trace


def held(hold_s: float) -> Callable[[GuestDaemon, Trace], bool]:
    def until(daemon: GuestDaemon, trace: Trace) -> bool:
        since = trace.converged_at
        return since is not None and trace.samples[-1][0] - since >= hold_s
    return until


def check_converged(daemon: GuestDaemon, clock: RecordingClock, trace: Trace) -> dict[str, Any]:
    st = daemon.status()
    assert trace.converged_at is not None, (trace.samples[-5:], st)
    held_for = trace.samples[-1][0] - trace.converged_at
    assert held_for >= HOLD_S, (held_for, st)
    # 0.5 s is below the step threshold: slewed; any step must fall in the first 3 updates
    assert all(0 <= u <= 3 for u in clock.step_at_update), \
        clock.step_at_update
    assert st["steps"] == len(clock.step_at_update)
    assert st["state"] == "synchronised"
    assert abs(st["true_offset_s"]) < 1e-3
    # the frequency estimate has found the software clock's +200 ppm (six runs on a loaded
    # 2-core machine gave 194-197 ppm after ~12 s; 15 ppm leaves room for scheduling noise)
    assert abs(st["frequency_ppm"] - FREQ_PPM) < 15, st["frequency_ppm"]
    tail = [abs(o) for t, o in trace.samples if t >= trace.converged_at]
    print(f"converged (<1 ms) after {trace.converged_at:.1f} s; max |true offset| over the "
          f"next {held_for:.1f} s: {max(tail) * 1e6:.0f} us; frequency "
          f"{st['frequency_ppm']:+.2f} ppm; steps at updates {clock.step_at_update}")
    return st


def test_chronyd_relay_guest_converges(
        tmp_path: Path, chrony_server: ChronyServer) -> None:  # noqa: F811
    relay = RelaySettings(upstreams=(chrony_server.address,), rate_limit=1000.0, rate_burst=1000)
    daemon, clock, trace = asyncio.run(
        run_guest(tmp_path, relay, held(HOLD_S), CONVERGE_WITHIN_S + HOLD_S))
    st = check_converged(daemon, clock, trace)
    assert [s["name"] for s in st["sources"]] == [
        f"relay:{daemon.settings.relay}#{chrony_server.address}"]


def test_host_clock_default_converges(tmp_path: Path) -> None:
    relay = RelaySettings(rate_limit=1000.0, rate_burst=1000)  # no upstreams: host clock
    daemon, clock, trace = asyncio.run(
        run_guest(tmp_path, relay, held(HOLD_S), CONVERGE_WITHIN_S + HOLD_S))
    st = check_converged(daemon, clock, trace)
    assert st["relay"]["upstreams"] == ["local"]


def test_lying_relay_is_refused(tmp_path: Path, chrony_server: ChronyServer) -> None:  # noqa: F811
    async def main() -> tuple[GuestDaemon, RecordingClock, Trace, LyingProxy, dict[str, Any]]:
        proxy = LyingProxy((chrony_server.host, chrony_server.port))
        upstream = await proxy.start()
        relay = RelaySettings(upstreams=(upstream,), rate_limit=1000.0, rate_burst=1000)
        before: dict[str, Any] = {}

        def tick(daemon: GuestDaemon, trace: Trace) -> None:
            converged = trace.converged_at
            if (not before and daemon.controller.updates > 3 and converged is not None
                    and trace.samples[-1][0] - converged >= 3.0):
                before.update(daemon.status())
                before["lie_at"] = trace.samples[-1][0]
                proxy.shift_s = 10.0

        def until(daemon: GuestDaemon, trace: Trace) -> bool:
            return bool(before) and trace.samples[-1][0] - before["lie_at"] >= 6.0

        try:
            daemon, clock, trace = await run_guest(
                tmp_path, relay, until, CONVERGE_WITHIN_S + 10, tick)
        finally:
            proxy.close()
        return daemon, clock, trace, proxy, before

    daemon, clock, trace, proxy, before = asyncio.run(main())
    assert before, "never synchronised before the lie started"
    st = daemon.status()
    assert proxy.lied >= 3
    assert st["refused_jumps"] > before["refused_jumps"]
    assert st["steps"] == before["steps"]  # no step toward the lie
    after = [abs(o) for t, o in trace.samples if t >= before["lie_at"]]
    assert max(after) < 1e-3, max(after)  # the clock stayed on true time
    print(f"lie +10 s: {proxy.lied} lying replies, refused_jumps {before['refused_jumps']} -> "
          f"{st['refused_jumps']}, max |true offset| meanwhile {max(after) * 1e6:.0f} us")
