"""The status text view shows the error bound and why the guest is in its state."""

from __future__ import annotations

from timesyncd.cli.status import format_status


def test_status_text_shows_bound_and_reason() -> None:
    text = format_status({"state": "unsynchronised", "state_reason": "sources_disagree",
                          "error_bound_s": 2.0004, "bound_verified": False, "sources": []})
    assert "unsynchronised (sources_disagree)" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("Error bound"))
    assert "2.000" in line and line.endswith("(unverified since a link loss)"), line
    old = format_status({"state": "synchronised", "sources": []})  # an older daemon
    assert "Root distance" in old and "unverified" not in old  # what it reports instead
