"""The frequency file: atomic round trip, every unusable file logged and ignored, and the
start-up rule (fresh file > plausible kernel correction > reset)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from guest_client import freq_file
from guest_client.freq_file import FreqRecord, load, save, start_frequency
from guest_client.settings import GuestSettings
from timesyncd.clock import ClockFrequency

NOW = 1_800_000_000.0
DAY = 86_400.0


def test_round_trip_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = str(tmp_path / "freq")
    save(path, FreqRecord(-123.456789, 0.25, NOW - 10))
    assert load(path, NOW, DAY) == FreqRecord(-123.456789, 0.25, NOW - 10)
    save(path, FreqRecord(12.5, 0.5, NOW))  # replaced, not appended
    assert load(path, NOW, DAY) == FreqRecord(12.5, 0.5, NOW)
    assert os.listdir(tmp_path) == ["freq"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "freq")
    save(path, FreqRecord(7.0, 0.1, NOW))

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(freq_file.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        save(path, FreqRecord(99.0, 0.1, NOW))
    monkeypatch.undo()
    assert load(path, NOW, DAY) == FreqRecord(7.0, 0.1, NOW)
    assert os.listdir(tmp_path) == ["freq"]


@pytest.mark.parametrize(("content", "why"), [
    (b"", "corrupt"),
    (b"\xff\xfe garbage", "corrupt"),
    (b"-122.5 0.1\n", "corrupt"),  # chrony's driftfile layout is not ours
    (b"timesync-freq 2 1.0 0.1 1800000000\n", "corrupt"),
    (b"timesync-freq 1 nan 0.1 1800000000\n", "corrupt"),
    (b"timesync-freq 1 1.0 -0.1 1800000000\n", "corrupt"),
    (b"timesync-freq 1 76923.0 0.1 1800000000\n", "corrupt"),  # a slew, not a base
    (b"timesync-freq 1 1.0 0.1 1800000000" + b" " * 5000, "corrupt"),
    (b"timesync-freq 1 1.0 0.1 1799000000\n", "stale"),
    (b"timesync-freq 1 1.0 0.1 1800009999\n", "future"),
])
def test_unusable_file_is_logged_and_ignored(tmp_path: Path, content: bytes, why: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "freq"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="guest_client.freq_file"):
        assert load(str(path), NOW, DAY) is None
    (msg,) = [r.getMessage() for r in caplog.records]
    assert str(path) in msg and why in msg and "ignored" in msg


def test_missing_or_unreadable_file_is_not_an_error(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="guest_client.freq_file"):
        assert load(str(tmp_path / "none"), NOW, DAY) is None
        assert load(str(tmp_path), NOW, DAY) is None  # a directory: cannot read
    assert "not there yet" in caplog.records[0].getMessage()
    assert "cannot read" in caplog.records[1].getMessage()


def test_start_rule() -> None:
    fresh = FreqRecord(-150.0, 0.2, NOW)
    # a fresh file wins over whatever the kernel holds, and is written to it
    sf = start_frequency(fresh, ClockFrequency(-76_923.0, False))
    assert (sf.ppm, sf.sd_ppm, sf.set_kernel) == (-150.0, 0.2, True)
    # no file: a plausible base frequency is kept as it is (nothing written)
    sf = start_frequency(None, ClockFrequency(-30.0, True))
    assert (sf.ppm, sf.sd_ppm, sf.set_kernel) == (-30.0, None, False)
    assert start_frequency(None, ClockFrequency(500.0, True)).set_kernel is False
    # a slew left behind, a tick moved, or an unreadable clock: reset to zero
    for kernel in (ClockFrequency(-76_923.0, False), ClockFrequency(-122.5, False),
                   ClockFrequency(500.1, True), None):
        sf = start_frequency(None, kernel)
        assert (sf.ppm, sf.set_kernel) == (0.0, True), kernel
        assert "reset" in sf.reason


def test_settings_freq_file_is_off_by_default_and_not_a_directory(tmp_path: Path) -> None:
    assert GuestSettings().freq_file is None
    with pytest.raises(ValueError, match="^freq_file:"):
        GuestSettings(clock="software", servers=("udp:127.0.0.1:123",),
                      freq_file=str(tmp_path)).validate()


def test_a_base_the_next_start_would_refuse_is_not_written(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """An early estimate beyond +-500 ppm would be read back as corrupt: it is not written
    (the old file stays), and that is logged and counted."""
    from collections import Counter

    from guest_client.clocks import SoftwareClock
    from guest_client.freq_keeper import FrequencyKeeper

    path = tmp_path / "freq"
    counters: Counter[str] = Counter()
    keeper = FrequencyKeeper(GuestSettings(freq_file=str(path)), SoftwareClock(), counters)
    keeper.write(str(path), FreqRecord(12.5, 0.1, 1_700_000_000.0))
    with caplog.at_level(logging.WARNING):
        keeper.write(str(path), FreqRecord(-1394.4, 5_500.0, 1_700_000_100.0))
    assert counters == {"freq_file_out_of_range": 1}
    assert "not written" in caplog.text and "-1394.400 ppm" in caplog.text
    kept = load(str(path), 1_700_000_200.0, 3600)
    assert kept is not None and kept.frequency_ppm == 12.5
