"""A simulated guest clock as a function of true time, for tests of application code.

``GuestTimeline`` answers "what does the guest clock read, and what error bound does the guest
claim, at true time t?" for one :class:`~sim.scenario.Scenario` and one strategy, with the very
models ``timesync drift-sim`` uses (its offsets at any instant are bit for bit the ones
drift-sim computes for the same options and seed). ``none`` and ``step`` are closed forms,
evaluated on demand; ``discipline`` runs the real controller in the engine lazily, only as far
into the scenario as a test has asked (a test that stops at day 3 simulates three days).

Finished ``discipline`` timelines can be saved and loaded (:func:`save_timeline`,
:func:`load_timeline`): the clock's anchors and the bound's records are all a reading needs,
because the oscillator is redrawn from the seed. The pytest plugin (``sim.pytest_plugin``)
caches timelines per session and, optionally, on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.clock import offsets_from_anchors
from sim.runner import build_inputs
from sim.scenario import DAY_S, STRATEGIES, NetworkParams, Scenario, parse_duration, parse_outage
from sim.strategies import FloatArray, SimInputs, build_engine, run_none, run_step

if TYPE_CHECKING:
    from guest_client.actions import Action
    from guest_client.controller import GuestController
    from sim.engine import Engine

#: Bump when what a saved timeline means changes (its file name includes it).
FORMAT = 1
#: The lazy engine runs ahead of the furthest instant asked in steps of this much true time.
CHUNK_S = 6 * 3600.0


def guest_error_bound_s(controller: GuestController, now_ns: int) -> float | None:
    """The guest's own bound on |clock - true time| at clock reading ``now_ns``.

    The one place the bound is read: the controller's ``error_bound_s`` where its status has
    one, else its root distance (the bound it publishes as the kernel's maxerror)."""
    status = controller.status(now_ns)
    bound = getattr(status, "error_bound_s", None)
    return status.root_distance_s if bound is None else bound


def scenario_from_options(**options: Any) -> tuple[Scenario, str]:
    """A scenario and strategy from drift-sim's option names (``--vsock-queue`` is
    ``vsock_queue``; ``outage`` takes one ``START:DURATION`` or a list; ``days`` also takes
    ``"36h"``-style durations). Unknown names are an error that lists the known ones."""
    opts = dict(options)
    strategy = str(opts.pop("strategy", "discipline"))
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown {strategy!r}; use one of {', '.join(STRATEGIES)}")
    net_names = {"vsock_delay": "vsock_delay_s", "vsock_jitter": "vsock_jitter_s",
                 "vsock_queue": "vsock_queue_s", "upstream_delay": "upstream_delay_s",
                 "upstream_jitter": "upstream_jitter_s", "asymmetry": "asymmetry_s",
                 "loss": "loss"}
    sc_names = {"days": "days", "seed": "seed", "load": "load",
                "load_coupling": "load_coupling_ppm", "minpoll": "minpoll",
                "maxpoll": "maxpoll", "initial_offset": "initial_offset_s",
                "upstream_error": "upstream_error_s"}
    unknown = sorted(set(opts) - set(net_names) - set(sc_names) - {"outage"})
    if unknown:
        known = sorted([*net_names, *sc_names, "outage", "strategy"])
        raise ValueError(f"enclave clock: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    outages = opts.pop("outage", ())
    if isinstance(outages, str):
        outages = (outages,)
    net_kw: dict[str, Any] = {net_names[k]: float(v) for k, v in opts.items() if k in net_names}
    net = NetworkParams(**net_kw, outages=tuple(parse_outage(o) for o in outages))
    sc_kw: dict[str, Any] = {sc_names[k]: v for k, v in opts.items() if k in sc_names}
    if isinstance(sc_kw.get("days"), str):
        sc_kw["days"] = parse_duration(sc_kw["days"]) / DAY_S
    return Scenario(network=net, strategies=(strategy,), **sc_kw), strategy


@dataclass(frozen=True)
class _BoundRecords:
    """The bound after each kernel-status publication: value and growth per true second
    (the bound is linear between the controller's updates)."""

    t: FloatArray
    value: FloatArray  # NaN: the guest claimed no bound (not synchronised yet)
    growth: FloatArray


class GuestTimeline:
    """Guest clock offset and claimed error bound over ``[0, scenario.duration_s]`` true s."""

    def __init__(self, scenario: Scenario, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown {strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.scenario = scenario
        self.strategy = strategy
        self.inputs: SimInputs = build_inputs(scenario)
        self.simulated_s = scenario.duration_s  # closed forms: all of it at once
        self._engine: Engine | None = None
        self._offset_at: Callable[[FloatArray], FloatArray]
        self._bounds: tuple[array[float], array[float], array[float]] | None = None
        self._anchors: tuple[FloatArray, FloatArray, FloatArray, FloatArray] | None = None
        if strategy == "none":
            self._offset_at = run_none(self.inputs, np.zeros(0)).offset_at  # type: ignore
        elif strategy == "step":
            self._offset_at = run_step(self.inputs, np.zeros(0)).offset_at  # type: ignore
        else:
            self._bounds = (array("d"), array("d"), array("d"))
            self._engine = build_engine(self.inputs)
            self._engine.on_actions = self._record_bound
            self._offset_at = self._engine.clock.offsets_at
            self.simulated_s = 0.0

    @property
    def duration_s(self) -> float:
        return self.scenario.duration_s

    def _record_bound(self, engine: Engine, actions: list[Action]) -> None:
        from guest_client.actions import SetFrequency, SetKernelStatus, StepClock

        # the bound is linear in time between these: a slew's start and end (SetFrequency)
        # change the rate at which the remaining offset in it shrinks
        if not any(isinstance(a, SetKernelStatus | SetFrequency | StepClock) for a in actions):
            return
        assert self._bounds is not None
        now_ns = engine.clock.reading_ns()
        b0 = guest_error_bound_s(engine.controller, now_ns)
        # its slope up to the next timer at most (a longer probe could pass the end of a slew
        # in progress), and over a long span: readings are whole nanoseconds
        nxt = engine.controller.next_timer_ns()
        span_ns = 1_000_000_000 if nxt is None else max(min(nxt - now_ns, 1_000_000_000), 1000)
        b1 = guest_error_bound_s(engine.controller, now_ns + span_ns)
        ts, values, growths = self._bounds
        ts.append(engine.now_s)
        values.append(math.nan if b0 is None else b0)
        # per true second (the fixture's time axis): the clock runs off true rate mid-slew
        rate = 1.0 + engine.clock.rate_error_ppm() * 1e-6
        growths.append(0.0 if b0 is None or b1 is None else (b1 - b0) * (1e9 / span_ns) * rate)

    def _simulate_to(self, true_s: float) -> None:
        if true_s < 0 or true_s > self.duration_s:
            raise ValueError(f"true time {true_s:g} s is outside the scenario's "
                             f"[0, {self.duration_s:g}] s; pass a longer days=")
        if self._engine is None or true_s <= self.simulated_s:
            return
        until = min(math.ceil(true_s / CHUNK_S) * CHUNK_S, self.duration_s)
        self._engine.run(until)
        self.simulated_s = until
        if until >= self.duration_s:
            self._freeze()

    def _freeze(self) -> None:
        """The whole scenario is simulated: keep the anchors, let the engine go."""
        assert self._engine is not None
        self._anchors = self._engine.clock.anchors()
        self._use_anchors()
        self._engine = None

    def _use_anchors(self) -> None:
        anchors, osc = self._anchors, self.inputs.rate.oscillator
        assert anchors is not None
        self._offset_at = lambda t: offsets_from_anchors(*anchors, osc, t)

    def offsets_s(self, true_s: FloatArray) -> FloatArray:
        """Guest minus true time (seconds) at each true instant (seconds from the start)."""
        t = np.asarray(true_s, dtype=np.float64)
        if len(t):
            self._simulate_to(float(t.max()))
            if float(t.min()) < 0:
                self._simulate_to(float(t.min()))
        return self._offset_at(t)

    def offset_s(self, true_s: float) -> float:
        return float(self.offsets_s(np.array([true_s]))[0])

    def error_bound_s(self, true_s: float) -> float | None:
        """The bound the guest claims on |offset| at ``true_s``; None when it claims none
        (``none`` and ``step`` never do; ``discipline`` before its first update)."""
        if self._bounds is None:
            return None
        self._simulate_to(true_s)
        ts, values, growths = self._bounds
        i = int(np.searchsorted(np.frombuffer(ts, dtype=np.float64), true_s, side="right")) - 1
        if i < 0 or math.isnan(values[i]):
            return None
        return values[i] + growths[i] * (true_s - ts[i])

    def finish(self) -> None:
        """Simulate the whole scenario now (before saving it)."""
        self._simulate_to(self.duration_s)


def cache_key(scenario: Scenario, strategy: str, version: str) -> str:
    doc = {"format": FORMAT, "version": version, "strategy": strategy,
           "scenario": scenario.to_json()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def save_timeline(timeline: GuestTimeline, path: Path) -> None:
    """Write a finished ``discipline`` timeline (anchors and bound records) as ``.npz``."""
    timeline.finish()
    assert timeline._bounds is not None, "only discipline timelines are worth saving"
    ts, values, growths = (np.array(c, dtype=np.float64) for c in timeline._bounds)
    assert timeline._anchors is not None
    a_t, a_reading, a_p, a_rate = timeline._anchors
    tmp = path.with_name(path.name + ".tmp.npz")  # then an atomic rename: no torn files
    np.savez(tmp, a_t=a_t, a_reading=a_reading, a_p=a_p, a_rate=a_rate, b_t=ts, b_value=values,
             b_growth=growths)
    tmp.replace(path)


def load_timeline(path: Path, scenario: Scenario, strategy: str) -> GuestTimeline:
    """A finished timeline from :func:`save_timeline`, without running the engine."""
    with np.load(path) as data:
        anchors = tuple(np.array(data[k]) for k in ("a_t", "a_reading", "a_p", "a_rate"))
        bounds = tuple(array("d", data[k].tolist()) for k in ("b_t", "b_value", "b_growth"))
    timeline = GuestTimeline.__new__(GuestTimeline)
    timeline.scenario, timeline.strategy = scenario, strategy
    timeline.inputs = build_inputs(scenario)
    timeline.simulated_s = scenario.duration_s
    timeline._engine = None
    timeline._bounds = bounds  # type: ignore[assignment]
    timeline._anchors = anchors  # type: ignore[assignment]
    timeline._use_anchors()
    return timeline
