"""The naming table in docs/METRICS.md and the relay's /metrics list the same families, with
the same types and labels, so a new metric cannot land without its row (and its review)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from relay_helpers import Guest, client_packet, start_fake_upstream

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import FrameType
from timesyncd.health import HealthReport

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "METRICS.md"
#: Families listed in the table before they are served (none today).
PLANNED: frozenset[str] = frozenset()
TYPES = {"G": "gauge", "C": "counter", "H": "histogram"}
_ROW = re.compile(r"^\| `(timesync_[a-z_]+)` \| ([GCH]) \|([^|]*)\|")


def naming_table() -> dict[str, tuple[str, frozenset[str]]]:
    """metric -> (type, label names), from the rows of the table."""
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in TABLE.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            labels = frozenset(re.findall(r"`([a-z_]+)`", m.group(3)))
            rows[m.group(1)] = (TYPES[m.group(2)], labels)
    return rows


async def _exposition(tmp_path: Path) -> str:
    """/metrics of a relay with every kind of series present: an upstream that answered, a
    reporting guest, a guest that left, a refused report."""
    up = await start_fake_upstream()
    sock = tmp_path / "r.sock"
    relay = RelayService(RelaySettings(listen=(f"unix:{sock}", f"fc:{tmp_path}/vm.sock:5"),
                                       upstreams=(up.address,), metrics="tcp:127.0.0.1:0"))
    await relay.start()
    try:
        stay = await Guest.connect(f"unix:{sock}", name="stay")
        stay.send(HealthReport(state="synchronised", offset_s=1e-6, frequency_ppm=2.0,
                               root_distance_s=1e-4, last_update=1.7e9, poll_s=16.0,
                               rejected={"bad_delay": 1}).frame())
        stay.send(framing.Frame(FrameType.HEALTH, 0, b"not json"))
        stay.request(1, 0, client_packet())
        assert (await stay.recv()).type == FrameType.NTP_REPLY
        left = await Guest.connect(f"unix:{tmp_path}/vm.sock_5", name="left")
        await left.close()
        async with asyncio.timeout(3):
            while len(relay.guests) != 1 or not relay.guests.records()[0].reports:
                await asyncio.sleep(0.01)
        text = relay.render_metrics().decode()
        await stay.close()
        return text
    finally:
        await relay.stop()
        up.close()


def exposed(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """metric (as written on the wire, ``_total`` included) -> (type, label names seen)."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels: dict[str, set[str]] = {name: set() for name in types}
    for fam in text_string_to_metric_families(text):
        wire = fam.name + "_total" if fam.type == "counter" else fam.name
        for s in fam.samples:
            labels[wire].update(k for k in s.labels if k != "le")
    return {n: (types[n], frozenset(labels[n])) for n in types}


@pytest.mark.timeout(30)
def test_every_served_family_is_in_the_naming_table_and_vice_versa(tmp_path: Path) -> None:
    table = naming_table()
    served = exposed(asyncio.run(_exposition(tmp_path)))
    assert sorted(set(served) - set(table)) == [], "served but not in docs/METRICS.md"
    missing = set(table) - set(served)
    assert sorted(missing - PLANNED) == [], "in docs/METRICS.md but not served"
    for name, (mtype, seen) in served.items():
        want_type, want_labels = table[name]
        assert mtype == want_type, f"{name}: served as {mtype}, table says {want_type}"
        # families with samples must carry exactly the table's labels
        if seen:
            assert seen == want_labels, f"{name}: labels {sorted(seen)} != table"


def test_the_table_is_parsed_and_follows_the_conventions() -> None:
    table = naming_table()
    assert len(table) > 30 and PLANNED <= set(table)
    for name, (mtype, labels) in table.items():
        assert (mtype == "counter") == name.endswith("_total"), name
        assert "name" not in labels or name == "timesync_guest_info", name
        assert "upstream" not in labels, name  # chrony_exporter's source_address instead
        assert not name.endswith(("_ppm", "_ms", "_us", "_percent")), name
