"""pytest plugin (``timesync[pytest]``): application tests on a simulated enclave clock.

Registered through the ``pytest11`` entry point as ``timesync`` (disable with
``-p no:timesync``). Loading it costs an import of this module only: the simulator, numpy and
freezegun are imported when a test first asks for a fixture. See docs/TESTING-YOUR-APP.md.

* ``enclave_clock``: an :class:`sim.enclave_clock.EnclaveClock`, freezegun started, options
  from ``@pytest.mark.enclave_clock(...)`` (drift-sim's options: ``strategy``, ``days``,
  ``seed``, ``load``, ``vsock_queue``, ``outage``, ...); ``--enclave-clock-strategy`` and
  ``--enclave-clock-seed`` override the marker for the whole run.
* ``enclave_clock_factory``: ``make(**options)`` for tests that compare several clocks (one
  runs at a time: making a new one stops the previous one).
* Timelines are cached per session by their options and the package version, and on disk
  with ``--enclave-clock-cache DIR`` (or the ``enclave_clock_cache`` ini key).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sim.enclave_clock import EnclaveClock
    from sim.scenario import Scenario
    from sim.timeline import GuestTimeline

STRATEGY_CHOICES = ("none", "step", "discipline")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("timesync", "simulated enclave clocks (timesync)")
    group.addoption("--enclave-clock-strategy", choices=STRATEGY_CHOICES, default=None,
                    help="run every enclave_clock test on this strategy instead of its "
                    "marker's (e.g. none: what breaks without time sync)")
    group.addoption("--enclave-clock-seed", type=int, default=None,
                    help="run every enclave_clock test with this seed instead of its marker's")
    group.addoption("--enclave-clock-cache", default=None, metavar="DIR",
                    help="keep simulated discipline timelines in DIR across sessions")
    parser.addini("enclave_clock_cache", "directory for simulated discipline timelines "
                  "(empty: this session's memory only)", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "enclave_clock(strategy='discipline', days=7, seed=1, load='diurnal', ...): "
        "options of the enclave_clock fixture, as timesync drift-sim's")


class TimelineCache:
    """This session's timelines by (scenario, strategy, package version); optionally on disk."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[tuple[Scenario, str, str], GuestTimeline] = {}
        self.built = 0  # timelines simulated (not found in memory or on disk)

    def get(self, scenario: Scenario, strategy: str) -> GuestTimeline:
        from sim.timeline import GuestTimeline, cache_key, load_timeline, save_timeline

        version = _package_version()
        key = (scenario, strategy, version)
        found = self._memory.get(key)
        if found is not None:
            return found
        path = None
        if self.directory is not None and strategy == "discipline":
            path = self.directory / f"timeline-{cache_key(scenario, strategy, version)}.npz"
            if path.exists():
                try:
                    found = load_timeline(path, scenario, strategy)
                except (OSError, ValueError, KeyError):
                    path.unlink(missing_ok=True)  # torn or foreign: simulate again
        if found is None:
            found = GuestTimeline(scenario, strategy)
            self.built += 1
            if path is not None:
                self.directory.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                save_timeline(found, path)
        self._memory[key] = found
        return found


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timesync")
    except PackageNotFoundError:
        return "unknown"


@pytest.fixture(scope="session")
def enclave_clock_timelines(pytestconfig: pytest.Config) -> TimelineCache:
    """The session's timeline cache (shared by every enclave clock of the run)."""
    directory = (pytestconfig.getoption("enclave_clock_cache")
                 or pytestconfig.getini("enclave_clock_cache"))
    return TimelineCache(Path(directory) if directory else None)


@pytest.fixture
def enclave_clock_factory(
        enclave_clock_timelines: TimelineCache) -> Iterator[Callable[..., EnclaveClock]]:
    """``make(**options) -> EnclaveClock`` with freezegun started; options as drift-sim's."""
    from sim.enclave_clock import EnclaveClock
    from sim.timeline import scenario_from_options

    current: list[EnclaveClock] = []

    def make(**options: Any) -> EnclaveClock:
        while current:
            current.pop().stop()
        try:
            scenario, strategy = scenario_from_options(**options)
        except ValueError as exc:
            raise pytest.UsageError(f"enclave_clock: {exc}") from None
        clock = EnclaveClock(enclave_clock_timelines.get(scenario, strategy))
        current.append(clock.start_freezing())
        return clock

    yield make
    while current:
        current.pop().stop()


@pytest.fixture
def enclave_clock(request: pytest.FixtureRequest,
                  enclave_clock_factory: Callable[..., EnclaveClock]) -> EnclaveClock:
    """A guest clock per ``@pytest.mark.enclave_clock(...)`` (default: discipline, 7 days,
    seed 1, diurnal load), freezegun started at true time 0."""
    marker = request.node.get_closest_marker("enclave_clock")
    options = dict(marker.kwargs) if marker else {}
    config = request.config
    if config.getoption("enclave_clock_strategy"):
        options["strategy"] = config.getoption("enclave_clock_strategy")
    if config.getoption("enclave_clock_seed") is not None:
        options["seed"] = config.getoption("enclave_clock_seed")
    return enclave_clock_factory(**options)
