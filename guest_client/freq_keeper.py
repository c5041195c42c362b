"""The daemon's frequency lifecycle: the correction the clock starts from, the base frequency
a clean stop leaves on it, and the frequency file kept meanwhile (chrony's driftfile).

The rules (which start wins, what a file must hold) are in :mod:`guest_client.freq_file`;
this is the I/O around them for :class:`guest_client.daemon.GuestDaemon`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from guest_client.freq_file import (
    FreqFileError,
    FreqRecord,
    StartFrequency,
    check,
    load,
    save,
    start_frequency,
)
from guest_client.settings import GuestSettings
from timesyncd.clock import Clock

log = logging.getLogger("guest_client.daemon")  # the daemon's lifecycle log

_NS = 1_000_000_000


class FrequencyKeeper:
    """Start frequency, clean-stop restore and frequency-file writes of one clock.

    ``base`` returns the controller's base frequency and its uncertainty (ppm, None while
    unknown); ``synchronised`` says whether the estimate is fresh enough to keep; failures
    are counted in ``counters`` (the daemon's ``daemon_errors``)."""

    def __init__(self, settings: GuestSettings, clock: Clock, counters: Counter[str]) -> None:
        self.settings = settings
        self.clock = clock
        self.counters = counters

    def decide_start(self) -> StartFrequency:
        path = self.settings.freq_file
        record = None
        if path:
            record = load(path, self.clock.now_ns() / _NS, self.settings.freq_file_max_age_s)
        try:
            kernel = self.clock.read_frequency()
        except OSError as exc:
            log.warning("cannot read the clock's frequency (%s): resetting it", exc)
            kernel = None
        return start_frequency(record, kernel)

    def restore(self, ppm: float, sd: float | None) -> None:
        """Leave the base frequency on the clock: a slew left behind would keep moving it
        (issue 9: SIGTERM mid-slew left -76,923 ppm, -0.77 s in the next 10 s)."""
        try:
            self.clock.set_frequency(ppm)
            log.info("stopped: clock left at its base frequency %+.3f ppm, no slew", ppm)
        except OSError as exc:
            self.counters["restore_failed"] += 1
            log.error("stopping: cannot put the clock back on its base frequency %+.3f ppm (%s); "
                      "it keeps its last correction", ppm, exc)
        if self.settings.freq_file and sd is not None:
            self.write(self.settings.freq_file, FreqRecord(ppm, sd, self.clock.now_ns() / _NS))

    def write(self, path: str, record: FreqRecord) -> None:
        """Keep ``record``, unless the next start would refuse it as corrupt (a base beyond
        the kernel's +-500 ppm: an early estimate from a few noisy samples)."""
        try:
            check(record)
        except FreqFileError as exc:
            self.counters["freq_file_out_of_range"] += 1
            log.warning("frequency file %s not written: %s (an estimate from too few samples)",
                        path, exc)
            return
        try:
            save(path, record)
        except OSError as exc:
            self.counters["freq_file_write_failed"] += 1
            log.warning("cannot write the frequency file %s: %s", path, exc)

    async def loop(self, path: str, base: Callable[[], tuple[float, float | None]],
                   synchronised: Callable[[], bool]) -> None:
        """Every ``freq_file_interval_s``, keep the current estimate while it is fresh."""
        while True:
            await asyncio.sleep(self.settings.freq_file_interval_s)
            ppm, sd = base()
            if not synchronised() or sd is None:
                continue
            record = FreqRecord(ppm, sd, self.clock.now_ns() / _NS)
            await asyncio.to_thread(self.write, path, record)
