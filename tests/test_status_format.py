"""`timesync status` at `chronyc tracking`/`sources -v` parity: tracking fields, a sources table
with state, reach, poll, last receive, offset +/- error, full names, a legend, and units that
follow the magnitude. The controller's side (the fields themselves) is checked on a real
relay+guest pair in test_cli.py."""

from __future__ import annotations

import random

from click.testing import CliRunner

from guest_client.controller import GuestController
from guest_client.source import SourceConfig
from timesyncd.cli import main
from timesyncd.discipline import DisciplineConfig
from timesyncd.status_view import format_status, human

NOW = 1_800_000_000.0
LONG = "relay:fc:/run/firecracker/vm-0123456789abcdef/v.sock:123#udp:169.254.169.123:123"


def _src(name: str, **kw: object) -> dict[str, object]:
    base = {"name": name, "trust": "host", "authenticated": False, "reachable": True,
            "selected": False, "offset_s": 1.5e-5, "delay_s": 2e-4, "stratum": 2, "samples": 8,
            "rejected": {}, "note": "", "reach": 0o377, "poll": 4, "last_rx": NOW - 12,
            "error_s": 3e-4}
    return {**base, **kw}


STATUS = {
    "state": "synchronised", "offset_s": 0.1924441, "frequency_ppm": -12.5,
    "root_distance_s": 0.3000017, "poll_s": 16.0, "last_update": NOW - 3, "steps": 0,
    "refused_jumps": 0, "rejected": {}, "holdover_s": 0.0,
    "stratum": 3, "reference": "nts:time.example.com", "leap_status": "normal",
    "rms_offset_s": 2.5e-5, "skew_ppm": 0.042, "residual_freq_ppm": 0.003,
    "remaining_correction_s": -4.2e-6,
    "sources": [
        _src("nts:time.example.com", selected=True, authenticated=True, trust="authenticated"),
        _src("udp:10.0.0.2:123", selected=True),
        _src("udp:10.0.0.3:123", note="falseticker", offset_s=0.3),
        _src("udp:10.0.0.4:123", note="outside the bounds of the authenticated sources"),
        _src(LONG, reachable=False, samples=0, reach=0, offset_s=None, error_s=None,
             last_rx=None, stratum=None),
    ],
}


def test_tracking_fields_in_human_units() -> None:
    text = format_status(STATUS, now=NOW)
    for line in ("Reference       : nts:time.example.com", "Stratum         : 3",
                 "Leap status     : normal", "RMS offset      : 25.000 us",
                 "Residual freq   : +0.003 ppm", "Skew            : 0.042 ppm",
                 "Frequency       : 12.500 ppm slow", "Last offset     : +192.444 ms",
                 "Root distance   : 300.002 ms", "System time     : -4.200 us"):
        assert line in text, text
    assert "192444" not in text and "300001" not in text
    assert human(1.5) == "+1.5 s" and human(-2e-9) == "-2.0 ns" and human(None) == "-"


def test_sources_table_states_reach_poll_last_rx_and_error() -> None:
    lines = format_status(STATUS, now=NOW).splitlines()
    rows = {ln[4:].split()[0]: ln for ln in lines if ln[:1] in "*+-x?" and ln[1:2] == " "}
    assert rows["nts:time.example.com"].startswith("* A ")
    assert rows["udp:10.0.0.2:123"].startswith("+ H ")
    assert rows["udp:10.0.0.3:123"].startswith("x H ")
    assert rows["udp:10.0.0.4:123"].startswith("- H ")
    cols = rows["udp:10.0.0.2:123"].split()
    # stratum, poll, reach (octal), last rx, offset +/- error, delay
    assert cols[3:7] == ["2", "4", "377", "12s"], cols
    assert "+15.0 us" in rows["udp:10.0.0.2:123"]
    assert "+/- 300.0 us" in rows["udp:10.0.0.2:123"]


def test_long_names_wrap_in_full_or_fit_one_line_with_wide() -> None:
    lines = format_status(STATUS, now=NOW).splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("? H "))
    pieces = [lines[first][4:]] + [ln[4:] for ln in lines[first + 1:first + 3]]
    assert all(len(p.split()[0]) <= 30 for p in pieces), lines  # wrapped at the column...
    assert "".join(p.split()[0] for p in pieces) == LONG  # ...and nothing cut off
    wide = format_status(STATUS, now=NOW, wide=True)
    line = next(ln for ln in wide.splitlines() if LONG in ln)
    assert line.startswith("? H ")  # ...or whole with --wide, unreachable shown as '?'


def test_verbose_legend_explains_every_state() -> None:
    text = format_status(STATUS, now=NOW, verbose=True)
    for words in ("* reference", "+ combined", "- usable but not combined", "x falseticker",
                  "? unreachable", "A authenticated"):
        assert words in text, text
    assert "Reach: octal register" in text
    assert "Source state" not in format_status(STATUS, now=NOW)


def test_status_command_has_verbose_and_wide() -> None:
    out = CliRunner().invoke(main, ["status", "--help"]).output
    assert "-v, --verbose" in out and "--wide" in out


def test_controller_tracking_before_any_sample() -> None:
    ctl = GuestController(DisciplineConfig(), random.Random(1), [SourceConfig("udp:x:1")])
    ctl.start(10**18)
    tr = ctl.tracking(10**18)
    assert tr.leap_status == "not synchronised" and tr.stratum is None
    assert tr.reference is None and tr.rms_offset_s is None and tr.skew_ppm is None
    src = ctl.status(10**18).sources[0]
    assert src.reach == 0 and src.poll == DisciplineConfig().minpoll and src.last_rx is None
