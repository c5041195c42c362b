"""The controller's one time base: elapsed time that a clock step does not move.

A step changes what the clock reads, not how much time has passed. The controller keeps
its times (deadlines, the last update, holdover since, next polls) as elapsed time since
its first reading, steps excluded, so a step needs no list of fields to shift: a time kept
before it stays at the same distance from now after it. Clock readings (Unix ns) come in
with every event and go out in ``next_timer_ns``, actions and status; :class:`TimeBase`
converts at that boundary, adding back the steps applied so far.

The ``CorrectionModel`` is the one consumer of clock readings inside: it records the steps
themselves, so it takes :meth:`TimeBase.clock_s` (the reading since the epoch, in seconds),
as do the samples' timestamps t1..t4 it corrects.
"""

from __future__ import annotations

from dataclasses import dataclass

_NS = 1_000_000_000


@dataclass
class TimeBase:
    """The epoch (the first clock reading seen) and the sum of the steps applied since.

    ``base_ns`` / ``t`` are elapsed ns / s: ``reading - epoch - stepped``, continuous across
    a step; ``reading_ns`` maps them back to what the clock reads now.
    """

    epoch_ns: int | None = None
    stepped_ns: int = 0

    def base_ns(self, reading_ns: int) -> int:
        """Elapsed ns of a clock reading (the first reading fixes the epoch)."""
        if self.epoch_ns is None:
            self.epoch_ns = reading_ns
        return reading_ns - self.epoch_ns - self.stepped_ns

    def t(self, reading_ns: int) -> float:
        """Elapsed seconds of a clock reading: the controller's time."""
        return self.base_ns(reading_ns) / _NS

    def reading_ns(self, base_ns: int) -> int:
        """The clock reading, on today's clock (steps so far included), of elapsed ns."""
        assert self.epoch_ns is not None
        return self.epoch_ns + self.stepped_ns + base_ns

    def reading_of(self, t: float) -> int:
        """The clock reading, on today's clock, of elapsed seconds ``t``."""
        return self.reading_ns(round(t * _NS))

    def clock_s(self, reading_ns: int) -> float:
        """A clock reading as seconds since the epoch, steps included: the scale of the
        ``CorrectionModel`` (which records the steps) and of the samples' timestamps."""
        if self.epoch_ns is None:
            self.epoch_ns = reading_ns
        return (reading_ns - self.epoch_ns) / _NS

    def step(self, delta_ns: int) -> None:
        """The clock was stepped by ``delta_ns``: later readings are that much further on."""
        self.stepped_ns += delta_ns
