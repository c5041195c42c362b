"""The one interface through which anything changes a clock (chrony's ``local.c`` idea).

Drivers: ``guest_client.clocks.SystemClock`` (Linux ``clock_adjtime``),
``guest_client.clocks.SoftwareClock`` (user space, for demos and tests) and
``sim.clock.SimClock`` (virtual time). The sans-IO controller never calls a clock: it returns
actions, and whoever drives it applies them here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from timesyncd.packet import Leap


@dataclass(frozen=True, slots=True)
class KernelStatus:
    """What we tell the kernel (``adjtimex`` maxerror/esterror/status) about our time."""

    synchronised: bool
    maxerror_s: float = 16.0
    esterror_s: float = 16.0
    leap: Leap = Leap.NONE


@dataclass(frozen=True, slots=True)
class ClockFrequency:
    """The frequency correction a clock holds now (ppm, positive runs faster), and whether its
    tick is nominal (the whole correction in the fine ``freq`` part, as a plain NTP daemon
    leaves it; a tick off nominal with a large correction is a slew left behind)."""

    ppm: float
    tick_nominal: bool


class Clock(ABC):
    """A clock that can be read, slewed through its frequency, and stepped.

    Sign conventions: ``set_frequency(+x)`` makes the clock run faster by x ppm relative to
    its uncorrected oscillator; ``step(+n)`` moves it forward by n ns.
    """

    #: Largest total frequency correction the driver can apply, ppm.
    max_frequency_ppm: float = 100_000.0
    #: Reading at which the last ``set_frequency`` took effect, as close as the driver can
    #: tell (None: unknown, read the clock after the call). The correction model needs it:
    #: mid-slew, each ms of error is 83 us at 83,333 ppm.
    last_change_ns: int | None = None

    @abstractmethod
    def now_ns(self) -> int:
        """Current reading of this clock, Unix nanoseconds."""

    @abstractmethod
    def set_frequency(self, ppm: float) -> None:
        """Set the total frequency correction (base plus any slew), effective now."""

    @abstractmethod
    def step(self, offset_ns: int) -> None:
        """Add ``offset_ns`` to the clock at once."""

    @abstractmethod
    def set_kernel_status(self, status: KernelStatus) -> None:
        """Publish synchronisation state, error bounds and leap warnings."""

    def read_frequency(self) -> ClockFrequency | None:
        """The correction the clock holds now, where the driver can read it (read only)."""
        return None

    def true_offset_ns(self) -> int | None:
        """This clock minus true time, where the driver knows it (software and sim clocks)."""
        return None
