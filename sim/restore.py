"""The ``snapshot-restore`` scenario: a guest paused (snapshotted) for ``pause_s`` at
``at_s`` and restored; its clock resumes where it stopped, behind by the pause.

For each strategy, what an application validating JWTs (``leeway_s``) sees after resume:
how long tokens fail and how many (at ``token_rate`` per second); for ``discipline`` (the
real controller on the simulator's engine, with or without a VMClock disruption at resume)
also the guest's states over the resume and the bound coverage after it. ``none`` never
recovers; ``step`` (the toolkits' step every ``step_interval_s`` from host time) recovers at
its next step, counted in guest uptime, which the pause does not advance.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from guest_client.controller import GuestController
from guest_client.disruption import VMCLOCK_MARKER
from sim.clock import SimClock
from sim.engine import Engine, Upstream
from sim.network import Hop, Network
from sim.oscillator import Oscillator
from timesyncd.discipline import DisciplineConfig

START_NS = 1_735_689_600 * 1_000_000_000
_VSOCK = Network(vsock=Hop(base_s=50e-6, jitter_s=20e-6), upstream=Hop(base_s=2e-3,
                                                                         jitter_s=0.5e-3))
SAMPLE_S = 0.01  # resolution of the after-resume figures (a burst takes milliseconds)


@dataclass(frozen=True, slots=True)
class RestoreScenario:
    pause_s: float = 7200.0
    at_s: float = 3600.0
    after_s: float = 1800.0  # watched after resume
    vmclock: bool = True
    seed: int = 1
    leeway_s: float = 60.0
    token_rate: float = 1.0
    step_interval_s: float = 300.0
    ppm: float = 12.0  # the oscillator's rate error

    def __post_init__(self) -> None:
        for name in ("pause_s", "at_s", "after_s", "token_rate", "step_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive")


def _failing(offsets: list[tuple[float, float]], leeway_s: float) -> float:
    """Seconds after resume until the offset stays within the leeway (the whole window if
    it never does)."""
    last_bad = None
    for t, off in offsets:
        if abs(off) > leeway_s:
            last_bad = t
    return 0.0 if last_bad is None else last_bad + SAMPLE_S


def _tokens(failing_s: float, sc: RestoreScenario) -> dict[str, Any]:
    recovered = failing_s < sc.after_s
    return {"failing_for_s": round(failing_s, 2) if recovered else None,
            "tokens_failed": round(failing_s * sc.token_rate), "recovered": recovered}


def run_restore(sc: RestoreScenario) -> dict[str, Any]:
    """Run the scenario; a JSON-ready document (see the module doc)."""
    rng = random.Random(sc.seed)
    osc = Oscillator(sc.ppm, 1e-3, random.Random(rng.getrandbits(32)))
    clock = SimClock(osc, start_unix_ns=START_NS)
    ctl = GuestController(DisciplineConfig(), random.Random(rng.getrandbits(32)))
    engine = Engine(ctl, clock, [Upstream("a", _VSOCK), Upstream("b", _VSOCK)],
                    random.Random(rng.getrandbits(32)))

    def marker(e: Engine) -> None:
        e._apply(e.controller.on_disruption(e.clock.now_ns(), VMCLOCK_MARKER))

    engine.pause(sc.at_s, sc.pause_s, marker if sc.vmclock else None)
    resume = sc.at_s + sc.pause_s
    engine.run(sc.at_s - 1e-6)
    state_before = str(ctl.state)
    states: list[dict[str, Any]] = []
    last: tuple[str, str] | None = None
    offsets: list[tuple[float, float]] = []
    claimed = covered = unknown = 0
    t = resume
    while t <= resume + sc.after_s:
        engine.run(t)
        st = ctl.status(clock.reading_ns())
        off = clock.offset_s()
        offsets.append((t - resume, off))
        key = (st.state, st.state_reason)
        if key != last:
            states.append({"after_s": round(t - resume, 1), "state": st.state,
                           "reason": st.state_reason})
            last = key
        bound = st.error_bound_s
        if bound is None or bound >= 16.0:
            unknown += 1
        else:
            claimed += 1
            covered += abs(off) <= bound
        t += SAMPLE_S if t - resume < 60 else 1.0
    disc = _tokens(_failing(offsets, sc.leeway_s), sc)
    disc.update(steps=len(clock.steps), step_decision=ctl.status(clock.reading_ns()).
                step_decision, states=states, bound_coverage=covered / claimed if claimed
                else None, samples_without_bound=unknown, state_before_pause=state_before,
                final_offset_s=clock.offset_s())
    # step: the toolkit's timer runs on guest uptime, frozen with the guest
    uptime_at_pause = sc.at_s % sc.step_interval_s
    step_failing = sc.step_interval_s - uptime_at_pause
    none = _tokens(sc.after_s, sc)
    step = _tokens(min(step_failing, sc.after_s), sc)
    return {"scenario": "snapshot-restore", **asdict(sc),
            "strategies": {"none": none, "step": step, "discipline": disc}}


def format_restore(doc: dict[str, Any], show_seed: bool = False) -> str:
    """The text report of :func:`run_restore` (``show_seed``: name the seed, for --seeds)."""
    seed = f", seed {doc['seed']}" if show_seed else ""
    lines = [f"snapshot-restore: paused {doc['pause_s']:.0f} s at {doc['at_s']:.0f} s, "
             f"{'with' if doc['vmclock'] else 'without'} VMClock; JWT leeway "
             f"{doc['leeway_s']:.0f} s, {doc['token_rate']:g} tokens/s; watched "
             f"{doc['after_s']:.0f} s after resume{seed}"]
    for name, r in doc["strategies"].items():
        failing = ("never recovered" if not r["recovered"]
                   else f"tokens fail for {r['failing_for_s']:.2f} s")
        lines.append(f"  {name:<10} {failing}, {r['tokens_failed']} tokens failed")
    d = doc["strategies"]["discipline"]
    cov = "n/a" if d["bound_coverage"] is None else f"{d['bound_coverage']:.4f}"
    lines.append(f"  discipline: {d['steps']} step(s) ({d['step_decision']}); bound "
                 f"coverage after resume {cov} ({d['samples_without_bound']} samples with no "
                 "bound claimed); states: " + ", ".join(
                     f"{s['after_s']:g} s {s['state']} ({s['reason']})" for s in d["states"]))
    return "\n".join(lines)


def _spread(values: list[float],
            worst: Callable[[list[float]], float] = max) -> dict[str, float | None]:
    """Median and worst; ``inf`` (never recovered) is reported as None, as per seed."""
    if not values:
        return {"median": None, "worst": None}
    out = {"median": float(statistics.median(values)), "worst": float(worst(values))}
    return {k: None if math.isinf(v) else v for k, v in out.items()}


def restore_summary(docs: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, the median and worst over seeds of what :func:`format_restore` shows:
    how long tokens fail after resume (None: not recovered in the watched window) and how
    many; for discipline also its steps, bound coverage (worst: the lowest) and the samples
    taken while no bound was claimed."""
    out: dict[str, Any] = {}
    runs = list(docs.values())
    for name in runs[0]["strategies"] if runs else ():
        rs = [d["strategies"][name] for d in runs]
        failing = [math.inf if r["failing_for_s"] is None else r["failing_for_s"] for r in rs]
        row: dict[str, Any] = {
            "seeds": len(rs), "recovered": sum(bool(r["recovered"]) for r in rs),
            "failing_for_s": _spread(failing),
            "tokens_failed": _spread([r["tokens_failed"] for r in rs])}
        if name == "discipline":
            row["steps"] = _spread([r["steps"] for r in rs])
            row["bound_coverage"] = _spread(
                [r["bound_coverage"] for r in rs if r["bound_coverage"] is not None], min)
            row["samples_without_bound"] = _spread([r["samples_without_bound"] for r in rs])
        out[name] = row
    return out


def format_restore_summary(summary: Mapping[str, Any]) -> str:
    """The table under the per-seed reports of ``--seeds``."""
    def secs(v: float | None) -> str:
        return "never" if v is None else f"{v:.2f} s"

    def pair(d: Mapping[str, Any], fmt: Callable[[float], str] = lambda v: f"{v:g}") -> str:
        return " / ".join("n/a" if d[k] is None else fmt(d[k]) for k in ("median", "worst"))

    n = max((s["seeds"] for s in summary.values()), default=0)
    lines = [f"summary over {n} seeds (median / worst)",
             f"  {'strategy':<12}{'tokens fail for':>24}{'tokens failed':>16}  recovered"]
    for name, s in summary.items():
        fail = " / ".join(secs(s["failing_for_s"][k]) for k in ("median", "worst"))
        lines.append(f"  {name:<12}{fail:>24}{pair(s['tokens_failed']):>16}  "
                     f"{s['recovered']} of {s['seeds']} seeds")
    d = summary.get("discipline")
    if d is not None:
        lines.append(f"  discipline: steps {pair(d['steps'])}; bound coverage after resume "
                     f"{pair(d['bound_coverage'], lambda v: f'{v:.4f}')}; samples with no "
                     f"bound claimed {pair(d['samples_without_bound'])}")
    return "\n".join(lines)
