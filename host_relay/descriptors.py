"""File descriptors: raise the soft limit at start, keep a budget, count accept failures.

A relay at its descriptor limit used to go quiet: new guests waited in the listen backlog
(their connects succeed, nothing answers), nothing was logged or counted. Now the soft limit
is raised to the hard one at start; connections are refused with a BUSY frame while a margin
of descriptors is still free (so the refusal itself can be written); and accept failures the
event loop reports (EMFILE, ENFILE, ENOBUFS, ENOMEM) are counted by errno and logged once
per episode, the episode ending at the next successful accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

#: Descriptors kept free for what is not counted one by one: refusals being written, log
#: files, DNS, a metrics client or two beyond those counted.
HEADROOM = 48
_ACCEPT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


@dataclass(frozen=True, slots=True)
class FdLimit:
    soft: int
    hard: int
    was: int  # the soft limit found at start


def raise_nofile() -> FdLimit:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (containers and hand-started
    relays often run with 1024 while the unit file asks for 65536)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, want, exc)
        else:
            return FdLimit(want, hard, soft)
    return FdLimit(soft, hard, soft)


def open_fds() -> int:
    """Descriptors open in this process now (-1 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return -1


class AcceptWatch:
    """Counts the loop's accept failures (a loop exception handler) and logs one line per
    episode; other exceptions go on to the handler that was there before."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.failing = 0  # failures in the current episode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.set_exception_handler(self._previous)
        self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS
                and "accept" in str(context.get("message", ""))):
            self.failed(exc.errno)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def failed(self, err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        self.counts[name] += 1
        self.failing += 1
        if self.failing == 1:
            log.error("cannot accept guest connections: %s (%s); new guests are refused until "
                      "descriptors free up", os.strerror(err), name,
                      extra={"event": "accept_failing", "errno": name})

    def accepted(self) -> None:
        """A connection was accepted: an episode of failures, if any, is over."""
        if self.failing:
            log.warning("accepting guest connections again after %d failed accepts",
                        self.failing, extra={"event": "accept_recovered",
                                             "count": self.failing})
            self.failing = 0


class FdBudget:
    """Refuse new connections and streams while fewer than :data:`HEADROOM` descriptors
    would be left: the refusal (a BUSY frame) can then still be accepted and written."""

    def __init__(self, errors: Counter[str]) -> None:
        self.errors = errors
        self.limit = FdLimit(0, 0, 0)
        self.base = 0  # open before any guest: listeners, upstream sockets, the loop's own
        self.refused = 0  # refusals in the current episode
        #: below this many held, :meth:`short` is False for sure and has nothing to log, so
        #: the accept path can skip it (and adding up what else holds descriptors)
        self.room = 1 << 62
        self._spare = 0

    def raise_limit(self) -> None:
        self.limit = raise_nofile()
        lim = self.limit
        log.info("descriptor limit %d%s (hard %d)", lim.soft,
                 f", raised from {lim.was}" if lim.was != lim.soft else "", lim.hard,
                 extra={"event": "fd_limit", "soft": lim.soft, "was": lim.was,
                        "hard": lim.hard})

    def measure_base(self, spare: int = 0) -> None:
        """``spare``: descriptors :attr:`room` leaves for holders the fast check does not
        count (the metrics endpoint's clients)."""
        self.base = max(open_fds(), 0)
        self._spare = spare
        self._set_room()

    def _set_room(self) -> None:
        soft = self.limit.soft
        self.room = soft - self.base - HEADROOM - self._spare if soft else 1 << 62

    def short(self, held: int) -> bool:
        """``held``: descriptors the relay holds for guests (connections, streams)."""
        used = self.base + held
        if used + HEADROOM < self.limit.soft or not self.limit.soft:
            if self.refused:
                log.warning("descriptors free again after %d refusals", self.refused,
                            extra={"event": "fd_limit_recovered", "count": self.refused})
                self.refused = 0
                self._set_room()
            return False
        self.errors["fd_limit"] += 1
        self.refused += 1
        self.room = -1  # every check counts until the episode ends
        if self.refused == 1:
            log.error("descriptor limit %d nearly reached (%d in use): refusing new guest "
                      "connections and streams with BUSY; raise LimitNOFILE or the hard limit",
                      self.limit.soft, used, extra={"event": "fd_limit_reached",
                                                    "limit": self.limit.soft, "used": used})
        return True


def fd_families(max_fds: int, accept_errors: Counter[str]) -> Iterator[Metric]:
    yield GaugeMetricFamily("timesync_relay_open_fds", "File descriptors open now.",
                            value=open_fds())
    yield GaugeMetricFamily("timesync_relay_max_fds",
                            "Soft descriptor limit (RLIMIT_NOFILE) in force.", value=max_fds)
    acc = CounterMetricFamily("timesync_relay_accept_errors",
                              "Failed accepts of guest connections, by errno.", labels=["errno"])
    for name, n in sorted(accept_errors.items()):
        acc.add_metric([name], n)
    yield acc
