"""drift-sim's progress bar: chunked engine runs give the same results, and the bar is drawn
only on a terminal, after the first second."""

from __future__ import annotations

import io
import time

import numpy as np

from sim.runner import run_scenario
from sim.scenario import Scenario
from timesyncd.cli.drift_sim import _Progress


def test_progress_reporting_does_not_change_results() -> None:
    scenario = Scenario(days=1.0, seed=3, strategies=("discipline",))
    plain = run_scenario(scenario)["discipline"]
    seen: list[tuple[str, float]] = []
    chunked = run_scenario(scenario, progress=lambda n, f: seen.append((n, f)))["discipline"]
    assert np.array_equal(plain.offsets_s, chunked.offsets_s)
    assert plain.max_abs_offset_s == chunked.max_abs_offset_s
    assert plain.extra == chunked.extra
    fractions = [f for _, f in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions) and len(fractions) > 10


class _Tty(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_bar_only_on_a_terminal_after_a_second() -> None:
    for tty, expect in ((True, True), (False, False)):
        stream = _Tty(tty)
        bar = _Progress(2, stream)
        bar("none", 0.0)  # within the first second: nothing drawn
        assert stream.getvalue() == ""
        bar.started = time.monotonic() - 2.0
        bar("discipline", 0.0)
        bar("discipline", 0.5)
        out = stream.getvalue()
        assert ("[" in out and "2/2 discipline" in out) is expect
        if expect:
            assert "#" * 22 in out.split("\r")[-1]  # 1.5 of 2 strategies: 22 of 30 filled
        bar.close()
