"""The daemon's side of disruptions: watch the VMClock page and reset what a restore or a
clone shares. asyncio glue around the sans-IO :mod:`guest_client.disruption`.

The page is read every ``poll_s`` (a few loads from a mapping: microseconds), and at once when
the device notifies (``FLAG_NOTIFICATION_PRESENT``: ``poll()`` on the device wakes on each
update; a read re-arms it). On a disruption the controller becomes disrupted
(``GuestController.on_disruption``); on a generation change, or a restore the controller
detected without VMClock, NTS keys and cookies are discarded, NTS-KE runs again and the relay
link is reset (:func:`reset_sessions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable

from guest_client.disruption import Disruption, VmClockWatch
from guest_client.nts_manager import NtsManager
from guest_client.relay_link import RelayLink
from guest_client.vmclock import VmClockError, VmClockReader, VmClockSnapshot

log = logging.getLogger(__name__)


def reset_sessions(nts: NtsManager, link: RelayLink | None, cause: str) -> None:
    """What every copy of a restored guest shares: the relay session and NTS secrets."""
    if link is not None:
        link.reset(f"session reset: {cause}")
    nts.discard_secrets(cause)
    log.warning("%s: NTS keys and cookies discarded, relay link reset, NTS-KE again", cause)


class VmClockMonitor:
    """Reads the page, feeds :class:`VmClockWatch`, calls ``on_disruption``."""

    def __init__(self, reader: VmClockReader, on_disruption: Callable[[Disruption], None], *,
                 min_interval_s: float, poll_s: float = 1.0) -> None:
        self.reader = reader
        self.watch = VmClockWatch(min_interval_s=min_interval_s)
        self._on_disruption = on_disruption
        self.poll_s = poll_s
        self.last: VmClockSnapshot | None = None
        self.errors = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._fd: int | None = None

    def check(self) -> None:
        """Read once; act on a disruption. A read error is counted and logged, never fatal."""
        try:
            snap = self.reader.read()
        except VmClockError as exc:
            self.errors += 1
            log.warning("%s", exc)
            return
        self.last = snap
        found = self.watch.observe(time.monotonic(), snap)
        if found is not None:
            self._on_disruption(found)

    async def start(self) -> None:
        self.check()
        if self.last is not None and self.last.notifies:
            self._listen()
        self._task = asyncio.create_task(self._run(), name="vmclock")

    def _listen(self) -> None:
        """Wake on the device's notification (a character device only: a file always polls
        readable)."""
        with contextlib.suppress(OSError):
            if not stat.S_ISCHR(os.stat(self.reader.path).st_mode):
                return
            fd = os.open(self.reader.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            self._fd = fd
            asyncio.get_running_loop().add_reader(fd, self._notified)

    def _notified(self) -> None:
        assert self._fd is not None
        with contextlib.suppress(OSError):
            os.pread(self._fd, 64, 0)  # re-arms the device's poll
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self.check()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        self.reader.close()

    def status(self) -> dict[str, object]:
        snap = self.last
        return {"path": self.reader.path, "torn_reads": self.reader.torn_reads,
                "errors": self.errors, **self.watch.status(),
                "clock_status": snap.status_name if snap else None,
                "leap_indicator": snap.leap_name if snap else None,
                "notifications": bool(snap and snap.notifies)}


DEFAULT_PATH = "/dev/vmclock0"


def open_monitor(path: str, allow_regular_file: bool, min_interval_s: float,
                 on_disruption: Callable[[Disruption], None]) -> VmClockMonitor | None:
    """The monitor for the ``vmclock`` option: None when off, or when the default device is
    absent (no VMClock on this VM); any other problem is a :class:`VmClockError`."""
    if not path or path == DEFAULT_PATH and not os.path.exists(path):
        return None
    reader = VmClockReader(path, allow_regular_file=allow_regular_file)
    return VmClockMonitor(reader, on_disruption, min_interval_s=min_interval_s)
