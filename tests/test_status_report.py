"""The typed status report: the JSON the daemon sends round-trips through it unchanged, older
daemons' objects still read, and the text view's chronyc ``~`` (too variable) state."""

from __future__ import annotations

import json

from timesyncd.status_report import STATUS_VERSION, SourceReport, StatusReport
from timesyncd.status_view import format_status

NOW = 1_800_000_000.0


def _src(name: str, **kw: object) -> dict[str, object]:
    base = {"name": name, "trust": "host", "authenticated": False, "reachable": True,
            "selected": False, "offset_s": 1e-5, "delay_s": 2e-4, "jitter_s": 2e-5,
            "stratum": 2, "samples": 8, "rejected": {}, "note": "", "reach": 0o377, "poll": 4,
            "last_rx": NOW - 5, "error_s": 3e-4, "freq_ppm": 1.0}
    return {**base, **kw}


def _status(*sources: dict[str, object]) -> dict[str, object]:
    return {"state": "synchronised", "offset_s": 1e-5, "frequency_ppm": 3.0,
            "root_distance_s": 4e-4, "poll_s": 16.0, "last_update": NOW - 3, "steps": 0,
            "refused_jumps": 0, "rejected": {}, "reference": "udp:10.0.0.1:123",
            "sources": list(sources)}


def _state_of(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if name in line)[0]


def test_noisy_unselected_source_is_marked_too_variable() -> None:
    st = _status(_src("udp:10.0.0.1:123", selected=True),
                 _src("udp:10.0.0.2:123", selected=True, jitter_s=5e-5),
                 _src("udp:10.0.0.3:123", jitter_s=2e-3),  # 40x the selected sources'
                 _src("udp:10.0.0.4:123", jitter_s=1e-4))  # 2x: merely not combined
    text = format_status(st, now=NOW)
    assert _state_of(text, "10.0.0.3") == "~"
    assert _state_of(text, "10.0.0.4") == "-"
    assert "~ too variable" in format_status(st, now=NOW, verbose=True)


def test_jitter_over_chrony_maxjitter_is_too_variable_without_selected_sources() -> None:
    st = _status(_src("udp:10.0.0.3:123", jitter_s=1.5), _src("udp:10.0.0.4:123"),
                 _src("udp:10.0.0.5:123", jitter_s=1.5, selected=True))  # in use: '+'
    text = format_status(st, now=NOW)
    assert [_state_of(text, f"10.0.0.{i}") for i in (3, 4, 5)] == ["~", "-", "+"]


def test_json_round_trips_unchanged_and_keeps_unknown_fields() -> None:
    doc = {**_status(_src("nts:a", nts={"note": "", "cookies": 3}, vm_field=1)),
           "relay": {"address": "unix:/x", "connected": True, "connects": 1, "upstreams": ["u"],
                     "pending": 0, "errors": {"timeout": 2}, "last_error": None},
           "time_floor": {"date": "2026-01-01T00:00:00+00:00", "source": "release"},
           "start_frequency": {"ppm": 1.5, "reason": "file"},
           "vmclock": {"state": "disrupted"}, "version": STATUS_VERSION}
    report = StatusReport.from_json(json.loads(json.dumps(doc)))
    assert report.relay is not None and report.relay.errors == {"timeout": 2}
    assert report.sources[0].nts == {"note": "", "cookies": 3}
    out = report.to_json()
    for key, value in doc.items():
        assert out[key] == value, key
    assert StatusReport.from_json(out) == report


def test_older_daemon_object_reads_with_defaults() -> None:
    report = StatusReport.from_json({"state": "synchronised", "sources": [{"name": "u"}]})
    assert report.version == 0 and report.relay is None
    assert report.sources == [SourceReport(name="u")]
    assert report.bound_s is None
    assert "daemon_errors" not in report.to_json()


def test_bound_prefers_error_bound_over_root_distance() -> None:
    assert StatusReport(root_distance_s=2.0, error_bound_s=1.0).bound_s == 1.0
    assert StatusReport(root_distance_s=2.0).bound_s == 2.0


def test_build_status_keeps_the_wire_fields_of_the_untyped_dict() -> None:
    """The keys the daemon sent before the report was typed, plus ``version`` only."""
    import random
    from dataclasses import asdict

    from guest_client.controller import GuestController
    from guest_client.source import SourceConfig
    from guest_client.status_build import build_status
    from timesyncd.discipline import DisciplineConfig
    from timesyncd.time_floor import TimeFloor

    ctl = GuestController(DisciplineConfig(), random.Random(1),
                          [SourceConfig("udp:x:1"), SourceConfig("nts:y")])
    ctl.start(10**18)
    nts = {"nts:y": {"note": "no cookies yet", "cookies": 0}}
    out = build_status(ctl, 10**18, clock="software", floor=TimeFloor.build(),
                       true_offset_ns=0, nts=nts, daemon_errors={"send_failed": 1}).to_json()
    old = {**ctl.status(10**18).to_json(), **ctl.tracking(10**18).to_json(),
           "true_offset_s": 0.0, "clock": "software", "time_floor": {}, "daemon_errors": {}}
    assert set(out) == set(old) | {"version"}
    assert out["version"] == STATUS_VERSION and out["daemon_errors"] == {"send_failed": 1}
    rows = {s["name"]: s for s in out["sources"]}
    # the controller reports configured trust; NTS verification is the daemon's to add
    assert set(rows["udp:x:1"]) == set(asdict(ctl.status(10**18).sources[0])) | {"authenticated"}
    assert rows["nts:y"]["authenticated"] and rows["nts:y"]["note"] == "no cookies yet"
    assert rows["nts:y"]["nts"] == nts["nts:y"] and not rows["udp:x:1"]["authenticated"]
