"""Relay observability: guest health reports -> Prometheus /metrics and /status, over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from relay_helpers import Guest, client_packet, start_fake_upstream

from host_relay.guest_registry import REPORT_BURST
from host_relay.relay_query import RelayQueryError, format_relay_status, query_relay
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.cli import main as cli_main
from timesyncd.framing import FrameType
from timesyncd.health import HealthReport

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _get(url: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, fetch)


async def scrape(relay: RelayService) -> Samples:
    status, text = await _get(f"http://{relay.metrics_address}/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def guest_series(samples: Samples, guest: str) -> list[Any]:
    return [k for k in samples if ("guest", guest) in k[1]]


#: Series kept for a guest that left (within the registry's TTL): presence, last seen, name.
KEPT_AFTER_LEAVING = {"timesync_guest_up", "timesync_guest_last_seen_age_seconds",
                      "timesync_guest_info"}


async def _until(cond: Any, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_relay(tmp_path: Path) -> Any:
    good = await start_fake_upstream()
    silent = await start_fake_upstream(reply_for=lambda _req: None)
    service = RelayService(RelaySettings(
        listen=(f"unix:{tmp_path}/relay.sock", f"fc:{tmp_path}/vm.sock:123"),
        upstreams=(good.address, silent.address), upstream_timeout_s=0.2,
        metrics="tcp:127.0.0.1:0"))
    await service.start()
    service.test_address = f"unix:{tmp_path}/relay.sock"  # type: ignore[attr-defined]
    # a Firecracker-style socket: its guest has an identity of its own (not this test's pid)
    service.test_vm_address = f"unix:{tmp_path}/vm.sock_123"  # type: ignore[attr-defined]
    service.test_upstreams = (good.address, silent.address)  # type: ignore[attr-defined]
    try:
        yield service
    finally:
        await service.stop()
        good.close()
        silent.close()


def with_relay(body: Any) -> Any:
    """Run ``async body(relay)`` on a fresh loop with a relay (two upstreams, metrics on)."""

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            async with running_relay(tmp_path) as relay:
                await body(relay)

        asyncio.run(main())

    test.__name__ = body.__name__
    test.__doc__ = body.__doc__
    return test


def _report(state: str, offset: float, freq: float, **kw: Any) -> framing.Frame:
    return HealthReport(state=state, offset_s=offset, frequency_ppm=freq, root_distance_s=2e-4,
                        last_update=1.7e9, poll_s=16.0, **kw).frame()


@with_relay
async def test_two_guests_one_scrape_shows_each_guest_and_upstream_counters(relay: Any) -> None:
    good, silent = relay.test_upstreams
    alpha = await Guest.connect(relay.test_address, name="alpha")
    beta = await Guest.connect(relay.test_address, name="beta")
    alpha.send(_report("synchronised", 12e-6, 3.25, rejected={"bad_delay": 4, "kod_rate": 1}))
    beta.send(_report("holdover", -0.0015, -41.5, holdover_s=120.0, steps=1,
                      error_bound_s=0.25, state_reason="sources_disagree",
                      disagreement_s=-2.0))
    alpha.request(1, 0, client_packet())
    beta.request(2, 0, client_packet())
    beta.request(3, 1, client_packet())  # the silent upstream: times out after 0.2 s
    assert (await alpha.recv()).type == FrameType.NTP_REPLY
    assert (await beta.recv()).type == FrameType.NTP_REPLY
    assert (await beta.recv()).type == FrameType.ERROR
    await _until(lambda: all(g.reports for g in relay.guests.records()))

    m = await scrape(relay)
    ids = {g.name: g.guest for g in relay.guests.records()}
    a = {"guest": ids["alpha"]}
    b = {"guest": ids["beta"]}
    # the announced name is only in the info series; the host-verified identity labels the rest
    assert value(m, "timesync_guest_info", **a, name="alpha") == 1
    assert value(m, "timesync_guest_up", **a) == 1
    assert value(m, "timesync_guest_last_seen_age_seconds", **a) == 0
    assert not [k for k in m if ("name", "alpha") in k[1] and k[0] != "timesync_guest_info"]
    assert value(m, "timesync_guest_offset_seconds", **a) == pytest.approx(12e-6)
    assert value(m, "timesync_guest_frequency_ratio", **a) == pytest.approx(3.25e-6)
    assert value(m, "timesync_guest_sync_state", **a, state="synchronised") == 1
    assert value(m, "timesync_guest_sync_state", **a, state="holdover") == 0
    assert value(m, "timesync_guest_rejected_samples_total", **a, reason="bad_delay") == 4
    assert value(m, "timesync_guest_offset_seconds", **b) == pytest.approx(-0.0015)
    assert value(m, "timesync_guest_frequency_ratio", **b) == pytest.approx(-41.5e-6)
    assert value(m, "timesync_guest_sync_state", **b, state="holdover") == 1
    assert value(m, "timesync_guest_holdover_seconds", **b) == 120.0
    assert value(m, "timesync_guest_steps_total", **b) == 1
    assert value(m, "timesync_guest_root_distance_seconds", **b) == pytest.approx(2e-4)
    assert value(m, "timesync_guest_error_bound_seconds", **b) == 0.25
    assert value(m, "timesync_guest_disagreement_seconds", **b) == -2.0
    assert value(m, "timesync_guest_state_reason", **b, reason="sources_disagree") == 1
    assert value(m, "timesync_guest_poll_interval_seconds", **b) == 16.0
    assert 0 <= value(m, "timesync_guest_report_age_seconds", **b) < 5

    assert value(m, "timesync_relay_upstream_requests_total", source_address=good) == 2
    assert value(m, "timesync_relay_upstream_replies_total", source_address=good) == 2
    assert value(m, "timesync_relay_upstream_rtt_seconds_count", source_address=good) == 2
    assert value(m, "timesync_relay_upstream_rtt_seconds_bucket", source_address=good,
                 le="+Inf") == 2
    assert value(m, "timesync_relay_upstream_requests_total", source_address=silent) == 1
    assert value(m, "timesync_relay_upstream_timeouts_total", source_address=silent) == 1
    assert value(m, "timesync_relay_upstream_rtt_seconds_count", source_address=silent) == 0
    assert value(m, "timesync_relay_residence_seconds_count") == 2
    assert 0 < value(m, "timesync_relay_residence_seconds_sum") < 0.1
    assert value(m, "timesync_relay_connections_open") == 2
    assert value(m, "timesync_relay_guests") == 2
    assert value(m, "timesync_relay_frames_total", direction="in", type="HEALTH") == 2

    # the same picture as JSON and as the `timesync status --relay` table
    doc = await asyncio.get_running_loop().run_in_executor(
        None, query_relay, f"tcp:{relay.metrics_address}")
    by_name = {g["name"]: g for g in doc["guests"]}
    assert by_name["beta"]["report"]["state"] == "holdover"
    assert by_name["alpha"]["report"]["frequency_ppm"] == 3.25
    runner = CliRunner()
    result = await asyncio.get_running_loop().run_in_executor(
        None, lambda: runner.invoke(cli_main, ["status", "--relay",
                                               f"tcp:{relay.metrics_address}"]))
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line.split() for line in result.output.splitlines()
            if line.startswith(("unix:", "conn:", "cid:", "tcp:"))}
    assert rows["alpha"][2] == "synchronised" and rows["alpha"][3] == "+12.0us"
    assert rows["alpha"][4] == "+3.250"
    assert rows["beta"][2] == "holdover" and rows["beta"][3] == "-1500.0us"
    assert rows["beta"][4] == "-41.500"
    assert good in result.output and silent in result.output
    as_json = await asyncio.get_running_loop().run_in_executor(
        None, lambda: runner.invoke(cli_main, ["status", "--json", "--relay",
                                               f"http://{relay.metrics_address}/"]))
    assert {g["name"] for g in json.loads(as_json.output)["guests"]} == {"alpha", "beta"}
    await alpha.close()
    await beta.close()


@with_relay
async def test_a_guest_that_leaves_keeps_only_presence_series_and_churn_keeps_nothing(
        relay: Any) -> None:
    stay = await Guest.connect(relay.test_address, name="stay")
    stay.send(_report("synchronised", 1e-6, 1.0))
    gone = await Guest.connect(relay.test_vm_address, name="gone")
    gone.send(_report("unsynchronised", 0.3, 90.0, rejected={"bad_stratum": 2}))
    await _until(lambda: len(relay.guests) == 2 and all(
        g.reports for g in relay.guests.records()))
    ids = {g.name: g.guest for g in relay.guests.records()}
    m = await scrape(relay)
    assert len(guest_series(m, ids["gone"])) > len(KEPT_AFTER_LEAVING)

    await gone.close()
    await _until(lambda: len(relay.guests) == 1)
    m = await scrape(relay)
    # what it said about its clock is gone; that it was here and left is not
    assert {k[0] for k in guest_series(m, ids["gone"])} == KEPT_AFTER_LEAVING
    assert value(m, "timesync_guest_up", guest=ids["gone"]) == 0
    assert 0 < value(m, "timesync_guest_last_seen_age_seconds", guest=ids["gone"]) < 5
    assert value(m, "timesync_guest_info", guest=ids["gone"], name="gone") == 1
    assert value(m, "timesync_guest_offset_seconds", guest=ids["stay"]) == pytest.approx(1e-6)
    after_gone = len(m)

    # churn: connections from the peer that stays (this process) report with new reasons and
    # leave; the peer never left, so nothing is kept of them
    for i in range(60):
        g = await Guest.connect(relay.test_address, name=f"churn{i}")
        g.send(_report("synchronised", 1e-6, 1.0, rejected={f"reason{i}": 1}))
        await _until(lambda: any(r.reports for r in relay.guests.records()
                                 if r.name.startswith("churn")))
        await g.close()
        await _until(lambda: len(relay.guests) == 1)
    m = await scrape(relay)
    assert not [k for k in m if any(v.startswith(("churn", "reason")) for _, v in k[1])]
    assert len(m) == after_gone  # relay-wide counters only changed values
    assert value(m, "timesync_relay_connections_accepted_total") == 62
    assert [g.guest for g in relay.guests.gone(time.monotonic_ns())] == [ids["gone"]]
    await stay.close()


@with_relay
async def test_disruptions_a_guest_acted_on_are_a_counter_and_old_guests_show_zero(
        relay: Any) -> None:
    """A restored guest's disruption count reaches /metrics (the fleet alert on a host
    flipping VMClock markers counts on it); a guest from before the field reports none."""
    new = await Guest.connect(relay.test_address, name="restored")
    new.send(_report("unsynchronised", -7200.0, 12.0, state_reason="disrupted",
                     disrupted=True, disruptions=3))
    old = await Guest.connect(relay.test_vm_address, name="old")
    old.send(framing.Frame(FrameType.HEALTH, 0, json.dumps(
        {"version": 1, "state": "synchronised", "offset_s": 1e-6, "steps": 2,
         "refused_jumps": 0}).encode()))
    await _until(lambda: len(relay.guests) == 2 and all(
        g.reports for g in relay.guests.records()))
    ids = {g.name: g.guest for g in relay.guests.records()}
    m = await scrape(relay)
    assert value(m, "timesync_guest_disruptions_total", guest=ids["restored"]) == 3
    assert value(m, "timesync_guest_state_reason", guest=ids["restored"],
                 reason="disrupted") == 1
    assert value(m, "timesync_guest_disruptions_total", guest=ids["old"]) == 0
    assert value(m, "timesync_guest_steps_total", guest=ids["old"]) == 2
    assert relay.stats.errors["health_bad_field"] == 0

    new.send(_report("synchronised", 1e-6, 12.0, state_reason="tracking", disrupted=False,
                     disruptions=4))
    await _until(lambda: next(g for g in relay.guests.records()
                              if g.name == "restored").reports == 2)
    m = await scrape(relay)
    assert value(m, "timesync_guest_disruptions_total", guest=ids["restored"]) == 4
    await new.close()
    await old.close()


@with_relay
async def test_bad_and_excess_health_reports_are_counted_and_never_affect_forwarding(
        relay: Any) -> None:
    g = await Guest.connect(relay.test_address, name="noisy")
    g.send(framing.Frame(FrameType.HEALTH, 0, b"not json"))
    g.send(framing.Frame(FrameType.HEALTH, 0, b'{"version":1,"state":"great"}'))
    g.send(framing.Frame(FrameType.HEALTH, 0, b'{"version":1,"state":"holdover",'
                                              b'"offset_s":NaN}'))
    for _ in range(REPORT_BURST + 3):
        g.send(_report("synchronised", 1e-6, 1.0))
    g.request(7, 0, client_packet())
    reply = await g.recv()
    assert reply.type == FrameType.NTP_REPLY and reply.request_id == 7
    errors = relay.stats.errors
    assert errors["health_bad_json"] == 1 and errors["health_bad_state"] == 1
    assert errors["health_bad_field"] == 1
    # the bucket holds REPORT_BURST tokens; three malformed reports used three of them
    assert errors["health_rate_limited"] == 6
    record = relay.guests.records()[0]
    assert record.reports == REPORT_BURST - 3 and record.report is not None
    m = await scrape(relay)
    assert value(m, "timesync_relay_errors_total", reason="health_rate_limited") == 6
    assert value(m, "timesync_guest_reports_total", guest=record.guest) == 2
    await g.close()


@with_relay
async def test_http_endpoint_refuses_what_it_does_not_serve(relay: Any) -> None:
    status, _ = await _get(f"http://{relay.metrics_address}/nope")
    assert status == 404
    reader, writer = await asyncio.open_connection(*relay.metrics_address.rsplit(":", 1))
    writer.write(b"garbage\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 400")
    writer.close()
    reader, writer = await asyncio.open_connection(*relay.metrics_address.rsplit(":", 1))
    writer.write(b"POST /metrics HTTP/1.1\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 405")
    writer.close()
    status, _ = await _get(f"http://{relay.metrics_address}/metrics")
    assert status == 200


def test_metrics_setting_must_be_tcp() -> None:
    with pytest.raises(ValueError, match="metrics: .* tcp:HOST:PORT"):
        RelaySettings(listen=("unix:/tmp/x.sock",), metrics="unix:/tmp/m.sock").validate()
    with pytest.raises(ValueError, match="metrics"):
        RelaySettings(listen=("unix:/tmp/x.sock",), metrics="bogus").validate()


def test_status_relay_reports_an_unreachable_relay() -> None:
    with pytest.raises(RelayQueryError):
        query_relay("tcp:127.0.0.1:1", timeout=0.5)
    result = CliRunner().invoke(cli_main, ["status", "--relay", "tcp:127.0.0.1:1"])
    assert result.exit_code == 1 and "--metrics tcp:127.0.0.1:1" in result.output


def test_table_renders_a_guest_without_report() -> None:
    doc = {"relay": {"connections_open": 1}, "guests": [
        {"guest": "cid:16", "name": "enclave-a", "report": None, "report_age_s": None}]}
    line = format_relay_status(doc).splitlines()[-1].split()
    assert line[:4] == ["cid:16", "enclave-a", "no", "report"]
