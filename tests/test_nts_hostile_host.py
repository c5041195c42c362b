"""NTS against an active host: forged NAKs, an impostor KE server, NAK/reply alternation,
control characters in relay text, and a server that restarts with new keys.

A real chronyd serves NTS with a certificate from a test CA (``-x``: it never touches the
clock); the host (``tests/hostile_relay.py``) sits between the guest daemon (software clock)
and the relay. Each test failed on the code before the fix; the docstrings say how.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_relay import EVIL_TEXT, HostileRelay
from loops import LOOPS, wait_for
from loops import run as run_loop
from nts_fixture import CertFiles, NtsServer, chronyd_nts, issue_cert, make_ca
from test_nts_relay import guest_settings, nts_status, relay_settings, synced

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from host_relay.service import RelayService

pytestmark = pytest.mark.timeout(90)

Scenario = Callable[[GuestDaemon, SoftwareClock, HostileRelay, RelayService], Awaitable[None]]


class CaServer:
    """chronyd with a CA-issued certificate, plus an expired one for the same name."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ca = make_ca(base)
        self.valid = issue_cert(self.ca, base, stem="valid")
        self.expired: CertFiles = issue_cert(
            self.ca, base, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=400),
            days=365, stem="expired")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CaServer:
    return CaServer(tmp_path_factory.mktemp("nts-pki"))


@pytest.fixture(scope="module")
def chrony(pki: CaServer) -> Iterator[NtsServer]:
    with chronyd_nts(pki.base / "chronyd", pki.valid, cafile=pki.ca.cert_file) as server:
        yield server


def run(chrony: NtsServer, tmp_path: Path, scenario: Scenario, *, loop: str = "asyncio",
        retry_min_s: float | None = None, guest_kw: dict[str, Any] | None = None) -> None:
    async def main() -> None:
        relay = RelayService(relay_settings(chrony, tmp_path / "relay.sock"))
        await relay.start()
        host = HostileRelay(tmp_path / "host.sock", f"unix:{tmp_path / 'relay.sock'}")
        await host.start()
        clock = SoftwareClock(offset_s=5.0)
        daemon = GuestDaemon(guest_settings(chrony, host.address, **(guest_kw or {})), clock,
                             rng=random.Random(7))
        if retry_min_s is not None:
            daemon.nts.retry_min_s = retry_min_s
        await daemon.start()
        try:
            await scenario(daemon, clock, host, relay)
        finally:
            await daemon.stop()
            await host.stop()
            await relay.stop()

    run_loop(main, loop)


def test_forged_nak_and_expired_certificate_never_disable_the_source(
        chrony: NtsServer, pki: CaServer, tmp_path: Path) -> None:
    """Issue 10 item 2. After sync the host forges a NAK and answers the KE itself with an
    expired certificate for the name, from the trusted CA, which it cannot prove. Before the
    fix: ``cert_expired`` with dates checked, and the source disabled until restart."""

    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await synced(daemon, clock)
        host.impersonate_ke, host.mode = pki.expired, "nak"
        await wait_for(lambda: nts_status(daemon)["nts"]["errors"].get("ke_peer_unproven", 0)
                       >= 2, 20, "impostor KE refused twice")
        src = nts_status(daemon)
        assert not src["nts"]["disabled"] and host.counts["impersonated_ke"] >= 2
        assert "someone in the path" in src["note"] and src["nts"]["errors"].get(
            "ke_cert_expired", 0) == 0
        assert all(c.isprintable() for c in src["note"])  # the host's close reason, cleaned
        assert daemon.status()["rejected"]["nts_ke_peer_unproven"] >= 2  # health/metrics
        kes = src["nts"]["key_exchanges"]
        host.impersonate_ke, host.mode = None, "honest"  # the attack stops: back to normal
        await wait_for(lambda: nts_status(daemon)["nts"]["key_exchanges"] > kes
                       and nts_status(daemon)["nts"]["ready"], 30, "recovery")
        samples = nts_status(daemon)["samples"]
        await wait_for(lambda: nts_status(daemon)["samples"] >= samples + 3, 10, "samples")
        assert abs(clock.true_offset_ns()) < 5e6

    run(chrony, tmp_path, scenario, retry_min_s=0.3)


def test_impostor_with_the_key_of_an_expired_certificate_is_a_misconfiguration(
        pki: CaServer, tmp_path: Path) -> None:
    """The other side of the distinction: a server that completes the handshake with an
    expired certificate is misconfigured; the source is disabled and the note says so."""
    with chronyd_nts(tmp_path / "srv", pki.expired, cafile=pki.ca.cert_file) as server:
        async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                           relay: RelayService) -> None:
            await wait_for(lambda: nts_status(daemon)["nts"]["disabled"], 20, "disabled")
            src = nts_status(daemon)
            assert src["note"].startswith("server misconfigured")
            assert src["nts"]["errors"]["ke_server_misconfigured"] == 1
            assert src["nts"]["errors"].get("ke_peer_unproven", 0) == 0

        run(server, tmp_path, scenario)


def test_nak_reply_alternation_backs_off(chrony: NtsServer, tmp_path: Path) -> None:
    """Issue 10 item 5. The host forges a NAK for every other reply. Before the fix each
    genuine reply reset the backoff: a key exchange every second poll (12 in 6 s here)."""

    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await synced(daemon, clock)
        await asyncio.sleep(1.0)  # KE_RESET_REPLIES verified replies: the backoff starts over
        before = relay.ke_proxy.counters["opened"]
        host.mode = "nak_alternate"
        await asyncio.sleep(6.0)
        forced = relay.ke_proxy.counters["opened"] - before
        assert host.counts["nak_alternate"] >= 3
        # backoff 0.2, 0.4, 0.8, 1.6, 3.2 s: at most 5 in 6 s, never reset by one reply
        assert 2 <= forced <= 6, forced
        assert not nts_status(daemon)["nts"]["disabled"]

    run(chrony, tmp_path, scenario, retry_min_s=0.2)


def test_control_characters_in_relay_errors_never_reach_the_log(
        chrony: NtsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 item 4. The host answers with ERROR frames whose text forges log lines, and
    sends ERRORs for ids never used. Before the fix every one was logged with its raw text."""

    async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                       relay: RelayService) -> None:
        await synced(daemon, clock)
        caplog.clear()
        host.mode, host.junk_errors = "error_text", 5
        await wait_for(lambda: host.counts["error_text"] >= 6, 10, "error replies")
        host.mode = "honest"
        await asyncio.sleep(0.2)
        link = daemon.link
        assert link is not None and link.counters["error_unknown_id"] >= 30
        unknown = [r for r in caplog.records if "not waiting for" in r.getMessage()]
        assert 1 <= len(unknown) <= 2  # the 1st and 10th (and 100th) only
        for record in caplog.records:
            text = record.getMessage()
            assert "\n" not in text and "\x1b" not in text and "\u202e" not in text, text
            assert len(text) < 600 and EVIL_TEXT[:20] not in text
        assert all("\x1b" not in str(v) for v in daemon.status()["relay"].values())

    with caplog.at_level(logging.INFO):
        run(chrony, tmp_path, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("naks", ["dropped", "seen"])
def test_server_restarted_with_new_keys_resyncs_within_five_polls(
        pki: CaServer, tmp_path: Path, loop: str, naks: str) -> None:
    """Issue 9 (NTS key rotation). chronyd restarts with new cookie keys. ``dropped``: its
    NAKs never arrive (ntpsec rotates without one; a host can drop them). Before the fix the
    guest spent all 8 cookies, one per poll, before running NTS-KE again."""
    first = chronyd_nts(tmp_path / "srv1", pki.valid, cafile=pki.ca.cert_file)
    server = first.__enter__()
    try:
        async def scenario(daemon: GuestDaemon, clock: SoftwareClock, host: HostileRelay,
                           relay: RelayService) -> None:
            await synced(daemon, clock)
            host.mode = "drop_nak" if naks == "dropped" else "honest"
            polls: list[float] = []
            answered: list[int] = []
            nts = daemon.nts
            real_send, real_reply = nts.send, nts._on_reply

            def send(name: str, data: bytes) -> None:
                polls.append(clock.now_ns())
                real_send(name, data)

            def reply(*args: Any) -> None:
                answered.append(len(polls))
                real_reply(*args)

            nts.send = send  # type: ignore[method-assign]
            nts._on_reply = reply
            kes = relay.ke_proxy.counters["opened"]
            await asyncio.to_thread(first.__exit__, None, None, None)
            answered.clear()
            polls.clear()
            second = chronyd_nts(tmp_path / "srv2", pki.valid, cafile=pki.ca.cert_file,
                                 ports=(server.ke_port, server.ntp_port))
            await asyncio.to_thread(second.__enter__)  # fresh ntsdumpdir: new keys
            try:
                await wait_for(lambda: answered and answered[-1] > 0, 20, "verified reply")
                first_ok = next(n for n in answered if n > 0)
                assert first_ok <= 5, (first_ok, nts_status(daemon))
                assert relay.ke_proxy.counters["opened"] == kes + 1
                if naks == "dropped":
                    assert host.counts["drop_nak"] >= 1
                    assert nts_status(daemon)["nts"]["errors"].get("nts_nak", 0) == 0
                await wait_for(lambda: daemon.controller.state == "synchronised", 10, "sync")
                st = daemon.status()
                assert abs(st["true_offset_s"] - st["offset_s"]) <= st["root_distance_s"]
            finally:
                await asyncio.to_thread(second.__exit__, None, None, None)

        # polls every second; a request unanswered for 0.3 s has timed out, and the key
        # exchange it starts has 0.7 s to finish (loaded CI), before the next poll
        run(server, tmp_path, scenario, loop=loop,
            guest_kw={"minpoll": 0, "maxpoll": 0, "request_timeout_s": 0.3})
    finally:
        first.__exit__(None, None, None)
