"""The direct ``--server udp:HOST:PORT`` path (UdpSource inside the daemon, no relay) against a
real chronyd on loopback: a software clock 0.5 s ahead and 200 ppm fast is slewed into line."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from chrony_fixture import ChronyServer, chrony_server  # noqa: F401 - pytest fixture

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings

pytestmark = pytest.mark.timeout(90)


def test_udp_server_path_converges_on_chronyd(chrony_server: ChronyServer,  # noqa: F811
                                                tmp_path: Path) -> None:
    async def main() -> tuple[GuestDaemon, SoftwareClock, float | None, float]:
        tmp = str(tmp_path)
        clock = SoftwareClock(200.0, 0.5)
        settings = GuestSettings(servers=(chrony_server.address,), clock="software",
                                 software_freq_ppm=200.0, software_offset_s=0.5,
                                 status_socket=os.path.join(tmp, "g.sock"), minpoll=0,
                                 maxpoll=1)
        daemon = GuestDaemon(settings, clock, rng=random.Random(3))
        start = time.monotonic()
        converged: float | None = None
        worst = 0.0
        await daemon.start()
        try:
            while time.monotonic() - start < 45.0:
                true = abs(clock.true_offset_ns()) / 1e9
                if true >= 1e-3:
                    converged, worst = None, 0.0
                elif converged is None:
                    converged = time.monotonic() - start
                else:
                    worst = max(worst, true)
                    if time.monotonic() - start - converged >= 5.0:
                        break
                await asyncio.sleep(0.05)
        finally:
            await daemon.stop()
        return daemon, clock, converged, worst

    daemon, clock, converged, worst = asyncio.run(main())
    st = daemon.status()
    assert converged is not None, st
    assert st["state"] == "synchronised", st
    assert [s["name"] for s in st["sources"]] == [chrony_server.address]
    assert abs(st["true_offset_s"]) < 1e-3 and worst < 1e-3
    assert not clock.steps  # 0.5 s is under the step threshold: slewed, never stepped
    print(f"udp direct: converged after {converged:.1f} s, then max |true offset| "
          f"{worst * 1e6:.0f} us; frequency {st['frequency_ppm']:+.1f} ppm")
