"""``EnclaveClock``: the wall clock of the code under test follows a simulated guest clock.

The test moves *true* time; freezegun makes ``time.time()``, ``time.time_ns()``,
``datetime.now()``/``utcnow()``, ``date.today()``, ``time.gmtime``/``localtime``/``strftime``
read the *guest* clock at that true time, as computed by :class:`sim.timeline.GuestTimeline`
(the drift-sim models). Monotonic clocks (``time.monotonic``, ``perf_counter`` and their
``_ns`` forms) are given back their real values, so asyncio, timeouts and pytest's own timings
keep working; a guest clock that steps backwards never makes them go back.

Not reached (they read the system clock in C or Rust, not through Python): OpenSSL's
certificate checks (``ssl``, pyOpenSSL's ``X509Store``) and ``cryptography``'s
``x509.verification`` verifier unless given ``.time(...)``; pass such code the guest time
explicitly (``clock.guest_time``), as you would in production code you want to test.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sim.scenario import DAY_S, parse_duration
from sim.timeline import GuestTimeline

_US = 1_000


def _seconds(value: float | str) -> float:
    """``90``, ``"10m"``, ``"6h"``, ``"2.5d"``: seconds."""
    return parse_duration(value) if isinstance(value, str) else float(value)


@dataclass(frozen=True)
class ClockState:
    """Both clocks at one instant, and the bound the guest claims on their difference."""

    true_s: float  # true seconds since the scenario's start
    true_time: dt.datetime  # aware, UTC
    guest_time: dt.datetime  # aware, UTC, microseconds (what datetime.now() returns)
    offset_s: float  # guest minus true
    error_bound_s: float | None  # None: the guest claims no bound (none, step, unsynchronised)

    @property
    def day(self) -> float:
        return self.true_s / DAY_S

    def __str__(self) -> str:
        bound = "none claimed" if self.error_bound_s is None else f"{self.error_bound_s:.6f} s"
        when = self.true_time.strftime("%Y-%m-%d %H:%M:%S")
        return (f"true day {self.day:.3f} ({self.true_s / 3600:.2f} h, {when} UTC): "
                f"guest clock {self.offset_s:+.6f} s, error bound {bound}")


@dataclass(frozen=True, repr=False)
class ClockFailure:
    """The first instant a check failed, with what it raised (or ``False``)."""

    state: ClockState
    error: BaseException | None

    @property
    def day(self) -> float:
        return self.state.day

    def __str__(self) -> str:
        what = "returned False" if self.error is None else repr(self.error)
        return f"first failure at {self.state}: {what}"

    __repr__ = __str__  # what ``assert failure is None, failure`` shows


class EnclaveClock:
    """A running guest clock for one test; see the module docstring. Use as the
    ``enclave_clock`` fixture (or ``enclave_clock_factory``) from ``timesync[pytest]``."""

    def __init__(self, timeline: GuestTimeline) -> None:
        self.timeline = timeline
        self.scenario = timeline.scenario
        self.strategy = timeline.strategy
        self.start = dt.datetime.fromtimestamp(self.scenario.start_unix_s, dt.UTC)
        self._true_s = 0.0
        self._freezer: Any = None
        self._factory: Any = None

    # --- freezegun --------------------------------------------------------------------------
    def start_freezing(self) -> EnclaveClock:
        try:
            from freezegun import freeze_time
        except ImportError as exc:  # the extra is not installed
            raise RuntimeError("enclave_clock needs freezegun: "
                               "pip install 'timesync[pytest]'") from exc
        self._freezer = freeze_time(self._guest_naive(self._true_s))
        self._factory = self._freezer.start()
        _keep_monotonic_real(self._freezer)
        return self

    def stop(self) -> None:
        if self._freezer is not None:
            self._freezer.stop()
            self._freezer = self._factory = None

    def _guest_naive(self, true_s: float) -> dt.datetime:
        # integer ns, as drift-sim adds a token's instant and the offset
        reading_ns = (self.scenario.start_ns + round(true_s * 1e9)
                      + round(self.timeline.offset_s(true_s) * 1e9))
        us = reading_ns // _US  # what a datetime can hold: floor to microseconds
        return dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=us)

    # --- moving true time -------------------------------------------------------------------
    def move_to(self, true_s: float | str | None = None, *, days: float | None = None,
                hours: float | None = None) -> EnclaveClock:
        """Set true time (seconds since the start, or ``days=``/``hours=``)."""
        if days is not None:
            target = days * DAY_S
        elif hours is not None:
            target = hours * 3600.0
        elif true_s is not None:
            target = _seconds(true_s)
        else:
            raise TypeError("move_to: give true_s, days= or hours=")
        guest = self._guest_naive(target)  # raises before moving if out of range
        self._true_s = target
        if self._factory is not None:
            self._factory.move_to(guest)
        return self

    def advance(self, seconds: float | str = 0.0, *, minutes: float = 0.0, hours: float = 0.0,
                days: float = 0.0) -> EnclaveClock:
        """Let true time pass; the guest clock moves by what it gains or loses meanwhile."""
        delta = _seconds(seconds) + minutes * 60.0 + hours * 3600.0 + days * DAY_S
        if delta < 0:
            raise ValueError("advance: true time only moves forward; use move_to")
        return self.move_to(self._true_s + delta)

    def sweep(self, every: float | str, *, start: float | str = 0.0,
              until: float | str | None = None) -> Iterator[ClockState]:
        """Move true time from ``start`` up to, not including, ``until`` (default: the
        scenario's end) in steps of ``every``, yielding the state at each instant."""
        step, t = _seconds(every), _seconds(start)
        end = self.timeline.duration_s if until is None else _seconds(until)
        if step <= 0:
            raise ValueError("sweep: every must be > 0")
        n = max(math.ceil((end - t) / step - 1e-9), 0)
        for i in range(n):
            self.move_to(t + i * step)
            yield self.state()

    def first_failure(self, check: Callable[[], object], every: float | str, *,
                      start: float | str = 0.0, until: float | str | None = None,
                      exceptions: type[BaseException] | tuple[type[BaseException], ...]
                      = Exception) -> ClockFailure | None:
        """Run ``check`` at each instant of :meth:`sweep`; the first instant it raises one of
        ``exceptions`` or returns ``False``, or None if it never does."""
        for state in self.sweep(every, start=start, until=until):
            try:
                ok = check()
            except exceptions as exc:
                return ClockFailure(state, exc)
            if ok is False:
                return ClockFailure(state, None)
        return None

    # --- reading both clocks ----------------------------------------------------------------
    @property
    def true_s(self) -> float:
        return self._true_s

    @property
    def day(self) -> float:
        return self._true_s / DAY_S

    @property
    def true_time(self) -> dt.datetime:
        """True time now (aware UTC): what an outside issuer (IdP, CA) stamps tokens with."""
        return self.start + dt.timedelta(seconds=self._true_s)

    @property
    def guest_time(self) -> dt.datetime:
        """The guest clock now (aware UTC, microseconds): what the code under test reads."""
        return self._guest_naive(self._true_s).replace(tzinfo=dt.UTC)

    @property
    def offset_s(self) -> float:
        """Guest minus true time now, seconds (negative: the guest is behind)."""
        return self.timeline.offset_s(self._true_s)

    @property
    def error_bound_s(self) -> float | None:
        """The bound the guest itself claims on |offset| now (``discipline`` only)."""
        return self.timeline.error_bound_s(self._true_s)

    def state(self) -> ClockState:
        return ClockState(self._true_s, self.true_time, self.guest_time, self.offset_s,
                          self.error_bound_s)

    def __repr__(self) -> str:
        return f"EnclaveClock({self.strategy}, seed {self.scenario.seed}: {self.state()})"


def _keep_monotonic_real(freezer: Any) -> None:
    """Undo freezegun's patching of the monotonic clocks (it fakes them from the frozen wall
    time, which would stop asyncio's loop and run backwards when the guest clock steps back)."""
    import freezegun.api as fz

    reals = [getattr(fz, name) for name in ("real_monotonic", "real_perf_counter",
                                            "real_monotonic_ns", "real_perf_counter_ns")
             if hasattr(fz, name)]
    for real in reals:
        setattr(time, real.__name__, real)
    real_ids = {id(r) for r in reals}
    for module, attribute, original in getattr(freezer, "undo_changes", []):
        if id(original) in real_ids:
            setattr(module, attribute, original)
