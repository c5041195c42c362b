"""End to end: two guest daemons (software clocks) report over their relay connections; one
scrape of the relay shows each one's offset, frequency and sync state."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from guest_client.clocks import SoftwareClock
from guest_client.daemon import GuestDaemon
from guest_client.settings import GuestSettings
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.health import HealthReport


def _guest_values(text: str) -> dict[str, dict[str, float]]:
    """Connected guests' series by announced name (joined through ``timesync_guest_info``)."""
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name.startswith("timesync_guest_")]
    names = {s.labels["guest"]: s.labels["name"] for s in samples
             if s.name == "timesync_guest_info"}
    up = {s.labels["guest"] for s in samples if s.name == "timesync_guest_up" and s.value == 1}
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        if s.labels.get("guest") not in up:
            continue
        key = s.name + (f":{s.labels['state']}" if "state" in s.labels else "")
        out.setdefault(names[s.labels["guest"]], {})[key] = s.value
    return out


@pytest.mark.timeout(60)
def test_two_daemons_are_visible_in_one_scrape(tmp_path: Path) -> None:
    async def main() -> None:
        sock = tmp_path / "relay.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",), metrics="tcp:127.0.0.1:0"))
        await relay.start()
        daemons = {}
        for name, ppm in (("fast", 150.0), ("slow", -80.0)):
            settings = GuestSettings(
                relay=f"unix:{sock}", clock="software", software_freq_ppm=ppm,
                software_offset_s=0.002, name=name, minpoll=-1, maxpoll=0,
                status_socket="", health_interval_s=0.25)
            daemons[name] = GuestDaemon(settings, SoftwareClock(ppm, 0.002))
        try:
            for d in daemons.values():
                await d.start()
            deadline = time.monotonic() + 30
            while True:
                reports = {r.name: r.report for r in relay.guests.records()}
                if all(isinstance(reports.get(n), HealthReport)
                       and reports[n].state == "synchronised" for n in daemons):
                    break
                assert time.monotonic() < deadline, f"guests did not synchronise: {reports}"
                await asyncio.sleep(0.1)
            # what the host shows is exactly what each guest last said
            async with asyncio.timeout(5):
                while not all(r.reports == daemons[r.name].health.sent  # type: ignore[union-attr]
                              for r in relay.guests.records()):
                    await asyncio.sleep(0.005)
            values = _guest_values(relay.render_metrics().decode())
            for name, d in daemons.items():
                last = d.health.last  # type: ignore[union-attr]
                assert last is not None and last.state == "synchronised"
                v = values[name]
                assert v["timesync_guest_sync_state:synchronised"] == 1
                assert v["timesync_guest_offset_seconds"] == last.offset_s
                assert abs(last.offset_s or 1) < 0.01
                assert v["timesync_guest_frequency_ratio"] * 1e6 == pytest.approx(
                    last.frequency_ppm)
                assert v["timesync_guest_root_distance_seconds"] == last.root_distance_s
                assert v["timesync_guest_poll_interval_seconds"] == last.poll_s
                assert v["timesync_guest_report_age_seconds"] < 1.0
            # bounded rate: about one report per 0.25 s while connected, never more than 1/s+burst
            for rec in relay.guests.records():
                up_s = (time.monotonic_ns() - rec.connected_mono_ns) / 1e9
                assert rec.reports <= up_s / 0.25 + 2 and rec.refused_reports == 0
            await daemons["fast"].stop()
            async with asyncio.timeout(5):
                while len(relay.guests) != 1:
                    await asyncio.sleep(0.02)
            assert set(_guest_values(relay.render_metrics().decode())) == {"slow"}
        finally:
            for d in daemons.values():
                await d.stop()
            await relay.stop()

    asyncio.run(main())


def test_health_reports_can_be_turned_off() -> None:
    s = GuestSettings(relay="unix:/tmp/x.sock", clock="software", health_interval_s=0.0)
    s.validate()
    assert GuestDaemon(s, SoftwareClock(0.0, 0.0)).health is None
