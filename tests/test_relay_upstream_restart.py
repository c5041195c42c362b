"""A real chronyd upstream stopped and restarted under a relay serving real guest daemons.

The guests (software clocks, 1-2 s polls) must be synchronised again within 3 polls of
chronyd answering again, under both event loops: on uvloop the relay used to stay deaf for
good after the first ICMP port unreachable. Outage figures for longer outages come from
``bench/relay_outage.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from typing import Any

import pytest
from chrony_fixture import chronyd
from loops import LOOPS, run
from test_relay_recovery import accounting

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings

pytestmark = pytest.mark.timeout(120)

GUESTS = 2
OUTAGE_S = 3.0


async def wait_until(cond: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not met in {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_guests_resynchronise_within_3_polls_after_chronyd_restarts(tmp_path, loop_kind):
    sock = str(tmp_path / "relay.sock")
    stack = contextlib.ExitStack()
    server = stack.enter_context(chronyd())
    port = server.port

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), upstreams=(server.address,),
                                           upstream_timeout_s=1.0))
        await relay.start()
        daemons = []
        for i in range(GUESTS):
            clock = SoftwareClock(50.0, 0.002)
            daemons.append(GuestDaemon(GuestSettings(
                relay=f"unix:{sock}", clock="software", software_freq_ppm=50.0,
                software_offset_s=0.002, status_socket=os.path.join(tmp_path, f"g{i}.sock"),
                minpoll=0, maxpoll=1, name=f"guest{i}"), clock, rng=random.Random(i)))
        try:
            for d in daemons:
                await d.start()
            await wait_until(lambda: all(d.status()["state"] == "synchronised"
                                         for d in daemons), 40, "first synchronisation")
            stack.close()  # chronyd stops: ICMP port unreachable for every request
            await asyncio.sleep(OUTAGE_S)
            before = [d.controller.updates for d in daemons]
            failed = relay.status()["upstreams"][0]
            assert failed["errors"], failed  # the outage was seen as errors
            # chronyd comes back on the same port (a package upgrade, a restart)
            back = await asyncio.to_thread(stack.enter_context, chronyd(port=port))
            assert back.port == port
            polls = max(d.status()["poll_s"] for d in daemons)
            took = await wait_until(
                lambda: all(d.controller.updates > b and d.status()["state"] == "synchronised"
                            for d, b in zip(daemons, before, strict=True)),
                3 * polls + 1.0, f"resynchronisation within 3 polls of {polls} s")
            print(f"\n{loop_kind}: guests synchronised again {took:.2f} s after chronyd "
                  f"returned (poll {polls} s)")
            for d in daemons:
                assert abs(d.status()["true_offset_s"]) < 0.01
            up = accounting(relay)[server.address]
            assert up["reachable"] is True and up["last_reply_age_s"] < polls + 1
        finally:
            for d in daemons:
                await d.stop()
            await relay.stop()

    try:
        run(main, loop_kind)
    finally:
        stack.close()
