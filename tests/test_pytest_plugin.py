"""The pytest plugin (timesync[pytest]): a guest clock from the real simulator under freezegun.

In-process tests drive ``EnclaveClock`` and the session cache directly; the shipped examples
and the plugin's loading cost are checked in a child pytest, as a user's suite would load it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from sim.enclave_clock import EnclaveClock
from sim.pytest_plugin import TimelineCache
from sim.runner import run_scenario
from sim.scenario import DAY_S, Scenario
from sim.timeline import scenario_from_options

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "freezegun", "sim.timeline", "sim.engine", "sim.runner", "sim.enclave_clock",
         "guest_client.controller", "jwt", "cryptography")


def plugin_args() -> list[str]:
    """Load the plugin explicitly unless its entry point is installed (then pytest loads it)."""
    names = {ep.name for ep in entry_points(group="pytest11")}
    return [] if "timesync" in names else ["-p", "sim.pytest_plugin"]


def child_pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                           *plugin_args(), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture
def clock_of():
    """``clock_of(**options)``: an EnclaveClock with freezegun started, stopped afterwards."""
    cache = TimelineCache(None)
    made: list[EnclaveClock] = []

    def make(**options: object) -> EnclaveClock:
        while made:  # one at a time, as the plugin's factory does
            made.pop().stop()
        scenario, strategy = scenario_from_options(**options)
        made.append(EnclaveClock(cache.get(scenario, strategy)).start_freezing())
        return made[-1]

    yield make
    while made:
        made.pop().stop()


def test_loading_the_plugin_imports_nothing_heavy(tmp_path: Path) -> None:
    """pytest with the plugin loaded (and other plugins not auto-loaded): the simulator, numpy
    and freezegun stay out of sys.modules until a test asks for an enclave clock."""
    (tmp_path / "test_probe.py").write_text(
        "import sys\n"
        f"HEAVY = {HEAVY!r}\n"
        "def test_probe(request):\n"
        "    assert request.config.pluginmanager.hasplugin('sim.pytest_plugin') or "
        "request.config.pluginmanager.hasplugin('timesync')\n"
        "    assert [m for m in HEAVY if m in sys.modules] == []\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                          "-p", "sim.pytest_plugin", "test_probe.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_shipped_examples_pass_on_discipline_and_fail_near_drift_sims_day_on_none(
        tmp_path: Path) -> None:
    passed = child_pytest(str(ROOT / "examples"), cwd=tmp_path)
    assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-2000:]
    assert "2 passed" in passed.stdout
    failed = child_pytest(str(ROOT / "examples"), "--enclave-clock-strategy", "none",
                          cwd=tmp_path)
    assert failed.returncode == 1, failed.stdout[-3000:]
    # failure sections (their "E" lines) and the summary's FAILED lines come in the same
    # order; the summary repeats the message in full when CI is set, so read only "E" lines
    names = re.findall(r"^FAILED \S+::test_(\w+?)_", failed.stdout, re.M)
    found = re.findall(r"^E\s+AssertionError: first failure at true day ([\d.]+)",
                       failed.stdout, re.M)
    days = {name: float(day) for name, day in zip(names, found, strict=True)}
    assert set(days) == {"session", "fresh"}, failed.stdout[-3000:]
    # drift-sim's first rejections for the same seed: JWT (leeway 3 s) and X.509 (backdate 3 s)
    sc = Scenario(strategies=("none",))
    jwt_day = run_scenario(sc)["none"].tokens["jwt"].first_rejection_s / DAY_S
    tokens = sc.tokens.__class__(x509_backdate_s=3, kinds=("x509",))
    x509_day = run_scenario(Scenario(strategies=("none",), tokens=tokens))["none"] \
        .tokens["x509"].first_rejection_s / DAY_S
    assert 2.5 < jwt_day < 3.0
    assert days["session"] == pytest.approx(jwt_day, abs=0.1)
    assert days["fresh"] == pytest.approx(x509_day, abs=0.1)


@pytest.mark.parametrize("strategy", ["none", "step", "discipline"])
def test_wall_clock_reads_the_simulated_guest_clock_of_drift_sim(clock_of, strategy: str) -> None:
    """time.time(), time_ns(), datetime.now() read true time + the offset drift-sim computes
    for the same options (its 60 s series, bit for bit)."""
    clock = clock_of(strategy=strategy, days=1, seed=3)
    ref = run_scenario(Scenario(days=1, seed=3, strategies=(strategy,)))[strategy]
    rng = np.random.default_rng(0)
    on_grid = np.isin(ref.times_s, np.arange(0, DAY_S, 60.0))
    times, offsets = ref.times_s[on_grid], ref.offsets_s[on_grid]
    for i in rng.choice(len(times), 25, replace=False):
        clock.move_to(float(times[i]))
        assert clock.offset_s == offsets[i]
        guest_ns = clock.scenario.start_ns + round(times[i] * 1e9) + round(offsets[i] * 1e9)
        guest_us = guest_ns // 1000
        assert round(time.time() * 1e6) == guest_us
        assert round(time.time_ns() / 1000) == guest_us  # freezegun: from the float
        now = dt.datetime.now(dt.UTC)
        assert now == clock.guest_time
        assert (now - clock.true_time).total_seconds() == pytest.approx(offsets[i], abs=2e-6)


def test_monotonic_clocks_stay_real_and_asyncio_runs(clock_of) -> None:
    """The step strategy jumps the guest clock backwards; monotonic clocks must not follow,
    nor stop: asyncio sleeps and timeouts work under the fixture."""
    clock = clock_of(strategy="step", days=1)
    m0, p0 = time.monotonic(), time.perf_counter_ns()
    before = dt.datetime.now(dt.UTC)
    clock.advance(hours=6)
    assert (dt.datetime.now(dt.UTC) - before).total_seconds() > 6 * 3600 - 1
    asyncio.run(asyncio.wait_for(asyncio.sleep(0.01), timeout=5))
    assert 0.005 < time.monotonic() - m0 < 60
    assert 0 < time.perf_counter_ns() - p0 < 60e9
    jumps = [state.offset_s for state in clock.sweep("1s", start="6h", until="370m")]
    assert any(b < a for a, b in zip(jumps, jumps[1:], strict=False))  # a backward step


@pytest.mark.parametrize("outage", [(), "0.4d:4h"])
def test_discipline_bound_contains_the_true_offset(clock_of, outage: object) -> None:
    """The bound the fixture reports is the guest's own, and it holds (sampled over a day),
    also while the relay is down and the guest is in holdover (the bound grows)."""
    clock = clock_of(strategy="discipline", days=1, seed=2, outage=outage)
    assert clock.error_bound_s is None  # before the first update: no claim
    checked = 0
    for state in clock.sweep("7m", start="10m"):
        assert state.error_bound_s is not None
        assert abs(state.offset_s) <= state.error_bound_s, state
        checked += 1
    assert checked > 200
    if outage:
        before = clock.move_to(hours=9.5).error_bound_s
        during = clock.move_to(hours=0.4 * 24 + 3.5).error_bound_s
        assert before is not None and during is not None and during > 2 * before
    for strategy in ("none", "step"):
        assert clock_of(strategy=strategy, days=1).move_to(days=0.5).error_bound_s is None


def test_discipline_simulates_only_as_far_as_asked(clock_of) -> None:
    clock = clock_of(strategy="discipline", days=7)
    clock.move_to(hours=20)
    assert clock.timeline.simulated_s == 24 * 3600.0  # up to the next 6 h chunk
    with pytest.raises(ValueError, match="days="):
        clock.move_to(days=7.5)


def test_timelines_are_cached_per_session_and_on_disk(tmp_path: Path) -> None:
    sc, strategy = scenario_from_options(strategy="discipline", days=0.25, seed=4)
    cache = TimelineCache(tmp_path)
    first = cache.get(sc, strategy)
    assert cache.get(sc, strategy) is first and cache.built == 1
    assert len(list(tmp_path.glob("timeline-*.npz"))) == 1
    other = TimelineCache(tmp_path)  # a later session
    again = other.get(sc, strategy)
    assert other.built == 0 and again is not first
    t = np.linspace(0, sc.duration_s, 997)
    assert np.array_equal(again.offsets_s(t), first.offsets_s(t))
    assert [again.error_bound_s(x) for x in t[::50]] == [first.error_bound_s(x) for x in t[::50]]
    # another seed is another timeline
    sc5, _ = scenario_from_options(strategy="discipline", days=0.25, seed=5)
    assert other.get(sc5, strategy) is not again and other.built == 1


def test_options_are_drift_sims_and_bad_ones_are_named() -> None:
    sc, strategy = scenario_from_options(strategy="step", days="36h", seed=9, load="bursty",
                                         vsock_queue=0.001, outage="1d:2h", minpoll=3)
    assert (strategy, sc.days, sc.seed, sc.load, sc.minpoll) == ("step", 1.5, 9, "bursty", 3)
    assert sc.network.vsock_queue_s == 0.001 and sc.network.outages == ((DAY_S, 7200.0),)
    with pytest.raises(ValueError, match="unknown option.*leway.*known:.*vsock_queue"):
        scenario_from_options(leway=3)
    with pytest.raises(ValueError, match="strategy"):
        scenario_from_options(strategy="ntp")


def test_the_documented_first_test_fails_as_the_guide_shows(tmp_path: Path) -> None:
    """docs/TESTING-YOUR-APP.md's code, as a reader would paste it, fails with its message."""
    doc = (ROOT / "docs" / "TESTING-YOUR-APP.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    for block in blocks:
        path = tmp_path / block.splitlines()[0].lstrip("# ").split()[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *plugin_args(), "tests/test_tokens_on_enclave_clock.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stdout[-3000:]
    shown = re.search(r"```\n(AssertionError: first failure .*?)```", doc, re.S)
    assert shown is not None
    assert " ".join(shown.group(1).split()) in " ".join(out.stdout.split())


def test_recorded_bound_is_the_controllers_own_at_any_instant() -> None:
    """Between updates the fixture extends the bound linearly from the last kernel-status
    publication; it must equal what the controller itself says at each instant (read by a
    second run of the same engine, sampled without touching its random streams)."""
    from sim.engine import Engine
    from sim.strategies import build_engine
    from sim.timeline import GuestTimeline, guest_error_bound_s

    sc, strategy = scenario_from_options(strategy="discipline", days=0.25, seed=6,
                                         outage="3h:1h")
    timeline = GuestTimeline(sc, strategy)
    live = build_engine(timeline.inputs)
    seen: list[tuple[float, float | None]] = []

    def sample(engine: Engine) -> None:
        seen.append((engine.now_s, guest_error_bound_s(engine.controller,
                                                       engine.clock.reading_ns())))

    live.sample_every_s, live.on_sample = 37.0, sample
    live.run(sc.duration_s)
    compared = 0
    for t, expect in seen:
        got = timeline.error_bound_s(t)
        if expect is None or expect >= 16.0:  # no claim yet, or the kernel's saturated value
            continue
        assert got == pytest.approx(expect, rel=1e-6, abs=1e-12), t
        compared += 1
    assert compared > 500
