"""The time floor: a date the guest's time can never be before.

A guest cut off from authenticated time (a host dropping NTS traffic) would otherwise accept
a certificate of any age during bootstrap, and any sample, however old. Like chrony and
systemd-timesyncd, timesync knows a date that has certainly passed: the release date of this
package (:data:`RELEASE_DATE`, updated with ``__version__`` at every release; a source
checkout is never older than it), optionally raised by the operator (guest setting
``time_floor``, e.g. the image's build date). What is before the floor is refused:

* replies whose server time is before it (``before_time_floor``; NTS ones in the NTS
  manager, plain ones in the daemon), and
* NTS-KE certificates whose notAfter is before it, even while dates are otherwise tolerated
  (bootstrap); certificate dates are checked against ``max(clock, floor)``.

Pure helpers, so the controller's step policy can ask the same question of a step
(:meth:`TimeFloor.allows`) without reading a clock itself.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

#: Release date of this version of timesync (UTC). Update it with ``__version__``.
RELEASE_DATE = dt.date(2026, 12, 5)

_NS = 1_000_000_000


def _date_ns(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()) * _NS


def parse_floor(text: str) -> int:
    """A configured floor, ``YYYY-MM-DD`` or an ISO 8601 date-time (UTC if no zone), as Unix
    ns; ValueError saying which forms are accepted."""
    try:
        if len(text) == 10:
            return _date_ns(dt.date.fromisoformat(text))
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date; use YYYY-MM-DD or an ISO 8601 date-time "
                         "such as 2027-01-01T00:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * _NS)


@dataclass(frozen=True, slots=True)
class TimeFloor:
    """The earliest acceptable time, Unix ns, and where it came from (for status/logs)."""

    floor_ns: int
    source: str = "release"

    @classmethod
    def build(cls, configured: str | None = None) -> TimeFloor:
        """The release floor, raised to ``configured`` (see :func:`parse_floor`) if later."""
        release = cls(_date_ns(RELEASE_DATE), "release")
        if not configured:
            return release
        mine = parse_floor(configured)
        return cls(mine, "configured") if mine > release.floor_ns else release

    def allows(self, time_ns: int) -> bool:
        """False when ``time_ns`` (a sample's server time, or where a step would put the
        clock) is before the floor."""
        return time_ns >= self.floor_ns

    def step_allowed(self, now_ns: int, step_ns: int) -> bool:
        """Whether stepping a clock reading ``now_ns`` by ``step_ns`` keeps it at or after the
        floor (for the step policy)."""
        return self.allows(now_ns + step_ns)

    @property
    def datetime(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.floor_ns / _NS, dt.UTC)

    def verify_time(self, clock_ns: int) -> dt.datetime:
        """When to check certificate dates: the clock's reading, or the floor if that is later
        (a clock before the floor is wrong, whatever it says)."""
        return dt.datetime.fromtimestamp(max(clock_ns, self.floor_ns) / _NS, dt.UTC)
