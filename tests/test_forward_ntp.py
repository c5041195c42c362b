"""--forward-ntp: an unmodified NTP client (ntplib) gets valid answers through the relay link."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ntplib
import pytest
from guest_fakes import FakeRelay
from loops import wait_for

from guest_client.forward_ntp import NtpForwarder
from guest_client.relay_link import RelayLink
from host_relay.service import RelayService
from host_relay.settings import RelaySettings


async def in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_ntplib_through_forwarder() -> None:
    async def main() -> None:
        relay = FakeRelay(upstreams=["udp:127.0.0.1:123", "local"], shift_ns=250_000_000)
        await relay.start()
        link = RelayLink(relay.address, "fwd-test", rx_clock=time.time_ns,
                         on_up=lambda ups: None, on_down=lambda r: None)
        fwd = NtpForwarder("udp:127.0.0.1:0", link, max_pending=8)
        await fwd.start()
        # before the relay link is up, requests are dropped and counted, not queued
        host, port = fwd.bound[:2]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x23" + b"\0" * 47, (host, port))
        await wait_for(lambda: fwd.counters["relay_down"] == 1)
        await link.start()
        try:
            await wait_for(lambda: link.connected)
            client = ntplib.NTPClient()
            for _ in range(3):
                resp = await in_thread(lambda: client.request(host, port=port, version=4,
                                                              timeout=2))
                assert resp.stratum == 2 and resp.mode == 4
                # the fake relay's clock is 0.25 s ahead: ntplib sees it, unchanged
                assert resp.offset == pytest.approx(0.25, abs=0.05)
            assert fwd.counters["answered"] == 3 and fwd.pending == 0
            assert relay.requests == 3
            # junk from a local client is counted and ignored; a reply-mode packet too
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"hello", (host, port))
                s.sendto(b"\x24" + b"\0" * 47, (host, port))
            await wait_for(lambda: fwd.counters["not_client_request"] == 2)
            assert relay.requests == 3
        finally:
            fwd.close()
            await link.stop()
            await relay.stop()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def forwarding(relay_address: str, **fwd_kw: Any) -> AsyncIterator[
        tuple[RelayLink, NtpForwarder, tuple[str, int]]]:
    """A relay link and a forwarder on an ephemeral loopback port, link connected."""
    link = RelayLink(relay_address, "fwd-test", rx_clock=time.time_ns,
                     on_up=lambda ups: None, on_down=lambda r: None, request_timeout_s=0.3)
    fwd = NtpForwarder("udp:127.0.0.1:0", link, **fwd_kw)
    await fwd.start()
    await link.start()
    try:
        await wait_for(lambda: link.connected)
        yield link, fwd, fwd.bound[:2]
    finally:
        fwd.close()
        await link.stop()


def client_request(i: int) -> bytes:
    return bytes([0x23]) + bytes(39) + i.to_bytes(8, "big")


def test_forwarder_pending_table_is_bounded() -> None:
    async def main() -> None:
        relay = FakeRelay(mode="silent")
        await relay.start()
        try:
            async with forwarding(relay.address, max_pending=4) as (_, fwd, addr):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for i in range(10):
                        s.sendto(client_request(i), addr)
                await wait_for(lambda: fwd.counters["forwarded"] + fwd.counters["busy"] == 10)
                assert fwd.counters["forwarded"] == 4 and fwd.counters["busy"] == 6
                # unanswered requests time out and free their slots
                await wait_for(lambda: fwd.pending == 0, timeout=3)
                assert fwd.counters["failed_timeout"] == 4
        finally:
            await relay.stop()

    asyncio.run(main())


def test_a_local_flood_is_rate_limited_before_it_costs_the_guest_its_relay_link(
        tmp_path: Path) -> None:
    """A broken local client firing 2,000 requests at once: the forwarder passes its own
    rate (8/s, burst 16) to the real relay, so the relay never sees a flood and the guest's
    link (its time) stays up; the rest are dropped and counted."""

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"unix:{tmp_path}/r.sock",)))
        await relay.start()
        try:
            async with forwarding(f"unix:{tmp_path}/r.sock", max_pending=4096,
                                  rate_limit=8.0) as (link, fwd, addr):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for i in range(2000):  # in batches the loop drains: none lost in UDP
                        s.sendto(client_request(i), addr)
                        if i % 50 == 49:
                            await asyncio.sleep(0.001)
                await wait_for(lambda: fwd.counters["forwarded"] + fwd.counters["rate_limited"]
                               == 2000)
                await wait_for(lambda: fwd.pending == 0)
                assert 16 <= fwd.counters["forwarded"] <= 40
                assert fwd.counters["answered"] == fwd.counters["forwarded"]
                assert relay.stats.errors["frame_flood"] == 0 and link.connects == 1
                assert link.connected
        finally:
            await relay.stop()

    asyncio.run(main())


def test_unmodified_chronyd_gets_time_through_forwarder(tmp_path: Path) -> None:
    """chronyd as the guest's own NTP client (`-Q`: measure and print, never correct the
    clock; `-x` as well) syncs through --forward-ntp, the relay, and the host clock."""
    chronyd = "/usr/sbin/chronyd"
    if not os.path.exists(chronyd):
        pytest.skip("chronyd not installed")

    async def main() -> None:
        sock = tmp_path / "relay.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        link = RelayLink(f"unix:{sock}", "fwd-chronyd", rx_clock=time.time_ns,
                         on_up=lambda ups: None, on_down=lambda r: None)
        fwd = NtpForwarder("udp:127.0.0.1:0", link, max_pending=8)
        await fwd.start()
        await link.start()
        try:
            await wait_for(lambda: link.connected)
            host, port = fwd.bound[:2]
            proc = await asyncio.create_subprocess_exec(
                chronyd, "-Q", "-x", "-u", "root", "-f", "/dev/null", "-t", "20",
                f"server {host} port {port} iburst maxsamples 4", "cmdport 0",
                f"pidfile {tmp_path / 'chronyd.pid'}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            text = out.decode()
            assert proc.returncode == 0, text
            # chronyd reports the measured offset of the host clock (the machine's own)
            match = re.search(r"System clock wrong by (-?[0-9.]+) seconds \(ignored\)", text)
            assert match, text
            assert abs(float(match.group(1))) < 0.005
            assert fwd.counters["answered"] >= 1 and fwd.pending == 0
        finally:
            fwd.close()
            await link.stop()
            await relay.stop()

    asyncio.run(main())
