"""``timesync makestep``: the control socket (off by default, 0600, SO_PEERCRED, logged) and
the controller's operator step (with authenticated sources: only to what they say)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from loops import LOOPS, run
from test_honest_guest import LAN, Watch, make

from guest_client.control_server import ControlServer, request_makestep
from guest_client.controller import SourceConfig
from guest_client.settings import GuestSettings
from sim.engine import Upstream


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_control_socket_is_off_by_default() -> None:
    assert GuestSettings().control_socket == ""


@pytest.mark.parametrize("loop", LOOPS)
def test_control_socket_checks_the_peer_and_logs_every_use(
        tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "ctl" / "guest.ctl")
    calls: list[int] = []

    def makestep() -> dict[str, Any]:
        calls.append(1)
        return {"stepped": True, "offset_s": 2.0, "reason": "test"}

    async def main() -> None:
        server = ControlServer(path, makestep)
        await server.start()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert await in_thread(request_makestep, path, 2.0) == {
                "stepped": True, "offset_s": 2.0, "reason": "test"}
            # a peer whose uid is not allowed is refused before it is read, and logged
            server.allowed_uids = frozenset({os.getuid() + 12345})
            refused = await in_thread(request_makestep, path, 2.0)
            assert "forbidden" in refused["error"] and len(calls) == 1
            server.allowed_uids = frozenset({os.getuid()})
            bad = await asyncio.open_unix_connection(path)
            bad[1].write(b"status\n")
            assert b"bad_request" in await bad[0].read()
            bad[1].close()
            assert server.errors == {"forbidden": 1, "bad_request": 1}
        finally:
            await server.stop()
        assert not os.path.exists(path)

    with caplog.at_level(logging.WARNING, logger="guest_client.control_server"):
        run(main, loop)
    text = caplog.text
    assert "makestep by pid" in text and f"uid {os.getuid()}" in text
    assert "refused pid" in text


def test_operator_step_follows_a_refused_jump_in_host_mode() -> None:
    lie = {"s": 0.0}
    engine, clock, ctl = make([Upstream("a", LAN, error_s=lambda t: lie["s"])],
                              minpoll=2, maxpoll=2)
    watch = Watch(engine, clock, ctl, reference_s=lambda t: lie["s"])
    watch.run(600.0, 1.0)
    lie["s"] = 2.0
    watch.run(650.0, 1.0)
    assert ctl.steps == 0
    actions, decision = ctl.make_step(clock.now_ns())
    engine._apply(actions)
    assert ctl.steps == 1 and decision.size_s == pytest.approx(-2.0, abs=0.01)
    watch.run(700.0, 1.0)
    assert abs(clock.offset_s() - 2.0) < 1e-3
    assert ctl.status(clock.now_ns()).state == "synchronised"
    assert watch.uncovered(start_s=660.0) == []


def test_operator_step_with_nts_goes_only_where_the_authenticated_source_says() -> None:
    """A host source lies by +1000 s next to a correct NTS source: an operator's makestep
    steps to the authenticated estimate (a few microseconds), never toward the host."""
    ups = [Upstream("nts", LAN), Upstream("host", LAN, error_s=1000.0)]
    engine, clock, ctl = make(ups, sources=[SourceConfig("nts", "authenticated"),
                                            SourceConfig("host")])
    engine.run(300.0)
    actions, decision = ctl.make_step(clock.now_ns())
    engine._apply(actions)
    assert abs(decision.size_s) < 1e-3
    engine.run(400.0)
    assert abs(clock.offset_s()) < 1e-3


@pytest.mark.parametrize("loop", LOOPS)
def test_makestep_cli_steps_a_running_guest(tmp_path: Path, loop: str) -> None:
    """End to end: a software-clock guest 0.5 s off, slewing slowly (100 ppm), is stepped by
    `timesync makestep` over its control socket, to what its source says."""
    import random

    from click.testing import CliRunner
    from guest_fakes import start_ntp_server
    from loops import wait_for

    from guest_client.daemon import GuestDaemon, make_clock
    from timesyncd.cli.status import makestep

    ctl_path = str(tmp_path / "guest.ctl")

    async def main() -> None:
        ntp = await start_ntp_server()
        settings = GuestSettings(servers=(ntp.address,), clock="software", status_socket="",
                                 software_offset_s=0.5, max_slew_ppm=100.0, minpoll=-1,
                                 maxpoll=0, burst=2, control_socket=ctl_path)
        daemon = GuestDaemon(settings, make_clock(settings), rng=random.Random(3))
        await daemon.start()
        try:
            await wait_for(lambda: daemon.controller.updates >= 1, 10, "first update")
            st = daemon.status()
            assert st["state"] == "unsynchronised" and st["state_reason"] == "correcting_offset"
            result = await in_thread(CliRunner().invoke, makestep, ["--socket", ctl_path])
            assert result.exit_code == 0, result.output
            # The step removes the remaining ~0.5 s (less what the slew already took, give or
            # take the measurement's noise), so the printed figure is near -0.5 s.
            found = re.search(r"stepped the clock by (-?[0-9.]+) s", result.output)
            assert found, result.output
            assert -0.51 < float(found.group(1)) < -0.45, result.output
            assert daemon.controller.steps == 1
            true = daemon.clock.true_offset_ns()
            assert true is not None and abs(true) < 10_000_000
            await wait_for(lambda: daemon.status()["state"] == "synchronised", 10, "sync")
            st = daemon.status()
            assert abs(st["true_offset_s"]) <= st["error_bound_s"]
        finally:
            await daemon.stop()
            ntp.close()
        assert not os.path.exists(ctl_path)

    run(main, loop)

