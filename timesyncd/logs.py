"""Service logging: plain or JSON lines, with repeated messages rate-limited and summarised.

The rate limit keys on the message template, so a fault that repeats every poll becomes one
line per interval plus a count of what was suppressed, instead of a flood.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

_STD_ATTRS = set(vars(logging.LogRecord("x", 0, "", 0, "", None, None))) | {"message", "asctime"}


def decade(count: int) -> bool:
    """True for the 1st, 10th, 100th, ... occurrence: a fault a peer can repeat at will is
    logged a handful of times, with its count, however often it happens (the counters have
    every one)."""
    return count > 0 and count == 10 ** (len(str(count)) - 1)


class EventGate:
    """Rate limit for events that are news one at a time but a flood in bulk (guest
    connects under churn): per ``interval_s`` window the first ``burst`` of each kind pass;
    the rest are only counted, and the next line of that kind reports how many were not
    logged. Works at any level (``RepeatFilter`` only limits warnings and above)."""

    def __init__(self, interval_s: float = 60.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock
        self._windows: dict[str, list[float]] = {}  # kind -> [start, passed, suppressed]

    def allow(self, kind: str) -> int | None:
        """None: do not log this one. Else how many of this kind went unlogged before it."""
        now = self._clock()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self.interval_s:
            suppressed = int(window[2]) if window else 0
            self._windows[kind] = [now, 1, 0]
            return suppressed
        if window[1] < self.burst:
            window[1] += 1
            return 0
        window[2] += 1
        return None


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                plain = isinstance(value, str | int | float | bool | None)
                out[key] = value if plain else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class RepeatFilter(logging.Filter):
    """Let each message template through at most ``burst`` times per ``interval_s``."""

    def __init__(self, interval_s: float = 60.0, burst: int = 3) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.burst = burst
        self._windows: dict[tuple[str, str], list[float]] = {}  # key -> [start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            dropped = int(window[2]) if window else 0
            self._windows[key] = [now, 1, 0]
            if dropped:
                record.suppressed_repeats = dropped
                record.msg = f"{record.msg} (and {dropped} similar messages suppressed)"
            if len(self._windows) > 1024:  # bounded: forget the oldest windows
                for old in sorted(self._windows, key=lambda k: self._windows[k][0])[:512]:
                    del self._windows[old]
            return True
        window[1] += 1
        if window[1] <= self.burst:
            return True
        window[2] += 1
        return False


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
