"""NTS-KE failures that are not KeError: refused at config time where possible, and at run
time counted, reported and retried with backoff like any KE failure (never a dead task)."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path
from typing import Any

import pytest
from nts_fixture import make_cert

from guest_client.clocks import SoftwareClock
from guest_client.nts_manager import NtsManager
from guest_client.nts_source import NtsServerSpec, parse_nts_server
from guest_client.relay_link import ReplyCallback, Upstream
from guest_client.settings import GuestSettings
from timesyncd.config import ConfigError, load_settings
from timesyncd.framing import Frame
from timesyncd.packet import NtpPacket

# --- (a) config time ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["a..b@127.0.0.1", "a..b", "x.a..b:4460", ".lead@127.0.0.1",
                                  "x" * 64 + ".example"])
def test_tls_name_that_is_not_valid_idna_is_a_config_error(spec: str) -> None:
    with pytest.raises(ValueError, match="not a valid host name"):
        parse_nts_server(spec)
    with pytest.raises(ConfigError, match="nts_servers: .*TLS name"):
        load_settings(GuestSettings, {"relay": "unix:/r", "clock": "software",
                                      "nts_servers": [spec]})


@pytest.mark.parametrize("spec", ["bücher.example", "localhost@127.0.0.1", "[::1]:4460",
                                  "time.example.com.", "127.0.0.1"])
def test_valid_tls_names_still_parse(spec: str) -> None:
    parse_nts_server(spec)


@pytest.mark.parametrize("content", [b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\n"
                                     b"bm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"])
def test_ca_bundle_that_cannot_be_loaded_is_a_config_error(tmp_path: Path,
                                                           content: bytes) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match="nts_ca_file: .*PEM CA bundle"):
        load_settings(GuestSettings, {"relay": "unix:/r", "clock": "software",
                                      "nts_servers": ["localhost@127.0.0.1"],
                                      "nts_ca_file": str(bad)})


def test_ca_bundle_that_loads_is_accepted(tmp_path: Path) -> None:
    cert = make_cert(tmp_path).cert
    GuestSettings(relay="unix:/r", clock="software", nts_servers=("localhost@127.0.0.1",),
                  nts_ca_file=str(cert)).validate()


# --- (b) run time ------------------------------------------------------------------------------


class FakeLink:
    """Just enough of a RelayLink for the manager: connected, offers the KE endpoint."""

    connected = True

    def __init__(self, ke_endpoint: str) -> None:
        self.upstreams = [Upstream(0, "udp:127.0.0.1:123")]
        self.hello_info: dict[str, object] = {"nts_ke": [{"name": ke_endpoint, "index": 0}]}
        self.last_refusal = ""
        self.last_tx_ns: int | None = None
        self.refuse: str | None = None

    def open_stream(self, handler: Any) -> int:
        return 7

    def send_frame(self, frame: Frame) -> bool:
        return True

    def close_stream(self, sid: int, reason: str = "") -> None:
        pass

    def cancel(self, rid: int) -> None:
        pass

    def send(self, upstream: int, packet: bytes, callback: ReplyCallback) -> int | None:
        if self.refuse is not None:
            self.last_refusal = self.refuse
            return None
        return 1


def make_manager(spec: NtsServerSpec, cafile: str | None,
                 errors: list[str]) -> tuple[NtsManager, FakeLink]:
    m = NtsManager([spec], cafile=cafile, clock=SoftwareClock(), is_synchronised=lambda: False,
                   on_reply=lambda *a: None, on_error=lambda n, r: errors.append(r),
                   on_sent=lambda *a: None, ke_timeout_s=0.5, retry_min_s=0.05)
    link = FakeLink(spec.ke_endpoint)
    m.attach(link)  # type: ignore[arg-type]
    return m, link


@pytest.mark.parametrize("case", ["bad_ca_file", "idna_invalid_name"])
def test_unexpected_ke_exception_is_a_counted_ke_failure_with_backoff(
        tmp_path: Path, case: str) -> None:
    """Before the fix the KE task died: nothing reported or counted, note 'NTS-KE pending',
    and only asyncio's 'Task exception was never retrieved'."""
    if case == "bad_ca_file":  # as if the file went bad after validation
        spec, cafile = parse_nts_server("localhost@127.0.0.1"), tmp_path / "empty.pem"
        cafile.write_bytes(b"")
    else:  # bypasses parse_nts_server, which now refuses it
        spec, cafile = NtsServerSpec("a..b@127.0.0.1", "a..b", "127.0.0.1", 4460), None
    errors: list[str] = []
    unhandled: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        m, _ = make_manager(spec, str(cafile) if cafile else None, errors)
        try:
            src = m.sources[spec.source_name]
            m.on_relay_up()
            for _ in range(100):
                if not m.status()[src.name]["ke_running"]:
                    break
                await asyncio.sleep(0.01)
            first_retry = m._not_before[src.name]
            assert errors == ["nts_ke_error"]
            assert src.counters["ke_error"] == 1
            assert src.note.startswith("NTS-KE failed: error (")
            m.on_relay_up()  # too early: the backoff holds it back
            await asyncio.sleep(0)
            assert src.counters["ke_error"] == 1
            await asyncio.sleep(max(0.0, first_retry - loop.time()) + 0.01)
            m.on_relay_up()  # retried, and the backoff grew
            for _ in range(100):
                if src.counters["ke_error"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert src.counters["ke_error"] == 2
            assert m._not_before[src.name] - first_retry >= 0.09  # 0.05 s, then 0.1 s
        finally:
            await m.stop()
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert errors == ["nts_ke_error", "nts_ke_error"]
    assert unhandled == []


def test_nts_send_reports_the_links_real_refusal() -> None:
    """Before the fix a busy link was reported as relay_not_connected."""
    from timesyncd.nts.ke_session import NtsKeResult

    spec = parse_nts_server("localhost@127.0.0.1")
    errors: list[str] = []

    async def main() -> None:
        m, link = make_manager(spec, None, errors)
        try:
            src = m.sources[spec.source_name]
            result = NtsKeResult(15, os.urandom(32), os.urandom(32), (b"c" * 64,) * 8,
                                 "127.0.0.1", 123)
            assert src.on_ke_result(result, {"udp:127.0.0.1:123": 0}) and src.ready
            request = NtpPacket(transmit_ts=1).encode()
            link.refuse = "send_busy"
            m.send(src.name, request)
            link.refuse = "send_oversized"
            m.send(src.name, request)
        finally:
            await m.stop()

    asyncio.run(main())
    assert errors == ["send_busy", "send_oversized"]


def test_failed_ke_is_retried_on_its_own_timer_until_stopped(tmp_path: Path) -> None:
    """NTS sources are not polled before they have keys, so no poll drives a KE retry: the
    manager retries after the backoff by itself, and stop() cancels what is scheduled."""
    spec, cafile = parse_nts_server("localhost@127.0.0.1"), tmp_path / "empty.pem"
    cafile.write_bytes(b"")  # every KE fails at once (cannot load the CA bundle)
    errors: list[str] = []

    async def main() -> None:
        m, _ = make_manager(spec, str(cafile), errors)
        try:
            src = m.sources[spec.source_name]
            m.on_relay_up()  # the only trigger: nothing calls send()
            for _ in range(200):
                if src.counters["ke_error"] >= 3:
                    break
                await asyncio.sleep(0.01)
            assert src.counters["ke_error"] >= 3, src.counters  # 0.05 s, 0.1 s, 0.2 s backoff
        finally:
            await m.stop()
        seen = src.counters["ke_error"]
        await asyncio.sleep(0.5)
        assert src.counters["ke_error"] == seen, "no retry after stop()"

    asyncio.run(asyncio.wait_for(main(), 10))
