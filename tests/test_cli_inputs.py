"""Strict inputs: every numeric option of every subcommand, and every numeric TOML key, refuses
NaN, the infinities and out-of-range values at parse time: exit 2, one error line naming the
option, no traceback. The options are discovered from the click command tree, so a new option
is covered (or fails the guard) without editing this file."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_client.settings import GuestSettings
from host_relay.settings import RelaySettings
from timesyncd.cli import main
from timesyncd.cli.options import Float, Int
from timesyncd.config import options


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}  # type: ignore


def _numeric_options() -> list[tuple[str, click.Option]]:
    found = []
    for name, cmd in _commands().items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.is_flag and isinstance(p.type, Float | Int):
                found.append((name, p))
    return found


NUMERIC = _numeric_options()
NON_FINITE = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999"]


def _bad_values(p: click.Option) -> list[str]:
    """Non-finite values, and just past each declared bound."""
    t = p.type
    assert isinstance(t, Float | Int)
    values = list(NON_FINITE)
    span = 1 if isinstance(t, Int) else 1e-3
    if t.min is not None:
        values.append(str(t.min if t.min_open else t.min - span))
    if t.max is not None:
        values.append(str(t.max if t.max_open else t.max + span))
    return values


def _assert_refused(res: object, named: str) -> None:
    out = res.output  # type: ignore[attr-defined]
    assert res.exit_code == 2, out  # type: ignore[attr-defined]
    assert isinstance(res.exception, SystemExit), res.exception  # type: ignore[attr-defined]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and named in errors[0], out
    assert out.rstrip().splitlines()[-1] == errors[0], "the error is one line, the last"


def test_every_number_option_uses_the_checked_types() -> None:
    """A float/int option with click's own types would let NaN through: none may exist."""
    assert len(NUMERIC) >= 60, [f"{c} {p.opts}" for c, p in NUMERIC]
    for name, cmd in _commands().items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.is_flag:
                assert not isinstance(p.type, click.types.FloatParamType | click.types.IntParamType
                                      ) or isinstance(p.type, Float | Int), (name, p.opts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_non_finite_and_out_of_range_values_are_refused(data: st.DataObject) -> None:
    command, opt = data.draw(st.sampled_from(NUMERIC), label="option")
    value = data.draw(st.sampled_from(_bad_values(opt)), label="value")
    res = CliRunner().invoke(main, [command, opt.opts[0], value])
    _assert_refused(res, opt.opts[0])


@pytest.mark.parametrize(("command", "opt"), NUMERIC, ids=[f"{c}{o.opts[0]}" for c, o in NUMERIC])
def test_each_option_refuses_nan(command: str, opt: click.Option) -> None:
    """Exhaustive over options (the property test samples): NaN passes no range check."""
    _assert_refused(CliRunner().invoke(main, [command, opt.opts[0], "nan"]), opt.opts[0])


@pytest.mark.parametrize(("section", "cls"), [("guest", GuestSettings), ("relay", RelaySettings)])
def test_every_numeric_toml_key_refuses_non_finite(tmp_path: Path, section: str,
                                                    cls: type) -> None:
    keys = [o for o in options(cls) if o.base is float]
    assert keys
    for opt in keys:
        for literal in ("nan", "inf", "-inf"):
            path = tmp_path / "c.toml"
            path.write_text(f"[{section}]\n{opt.key} = {literal}\n")
            res = CliRunner().invoke(main, [section, "--config", str(path)])
            _assert_refused(res, opt.key)
            assert "not a finite number" in res.output


@pytest.mark.parametrize(("args", "named"), [
    (["wait-sync", "--max-offset", "-1"], "--max-offset"),
    (["wait-sync", "--max-offset", "0"], "--max-offset"),
    (["wait-sync", "--max-error", "0"], "--max-error"),
    (["demo", "--duration", "-5"], "--duration"),
    (["drift-sim", "--seed", "3", "--seeds", "1-2"], "--seeds"),
    (["drift-sim", "--outage", "8d:1h"], "--outage"),
    (["drift-sim", "--days", "1", "--outage", "1d:1h"], "--outage"),
    (["drift-sim", "--outage", "1d:nan"], "--outage"),
    (["drift-sim", "--load", "constant:nan"], "--load"),
    (["drift-sim", "--seeds", "1-100000000000"], "--seeds"),
    (["drift-sim", "--strategies", "bogus"], "--strategies"),
    (["drift-sim", "--scenario", "lan-reference", "--plot", "x.png"], "--plot"),
    (["drift-sim", "--scenario", "lan-reference", "--csv", "x.csv"], "--csv"),
    (["drift-sim", "--scenario", "lan-reference", "--days", "2"], "--days"),
    (["drift-sim", "--scenario", "lan-reference", "--strategies", "step"], "--strategies"),
    (["guest", "--clock", "software", "--relay", "unix:/x", "--minpoll", "6", "--maxpoll", "4"],
     "minpoll"),
])
def test_impossible_combinations_are_usage_errors(args: list[str], named: str) -> None:
    _assert_refused(CliRunner().invoke(main, args), named)


def test_lan_reference_honours_the_poll_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accuracy issue: lan-reference runs at the given polls (one given fixes both)."""
    import sim.runner

    seen: list[tuple[int, int | None, int | None, bool]] = []

    def fake(seed: int, minpoll: int | None = None, maxpoll: int | None = None,
             noisy: bool = False) -> dict[str, object]:
        seen.append((seed, minpoll, maxpoll, noisy))
        return {"scenario": {}, "strategies": {"discipline": {
            "rms_offset_s": 0.0, "max_abs_offset_s": 0.0, "rms_freq_error_ppm": 0.0,
            "converged_after_s": 1.0, "steps": 0, "bound_coverage": 1.0,
            "max_true_over_bound": 0.5, "median_bound_s": 1e-4}},
            "reference": {"rms_offset_s": 0.0, "max_abs_offset_s": 0.0}}

    monkeypatch.setattr(sim.runner, "run_lan_reference", fake)
    for args in (["--minpoll", "6", "--maxpoll", "10"], ["--maxpoll", "8"], []):
        res = CliRunner().invoke(main, ["drift-sim", "--scenario", "lan-reference", *args,
                                        "--seed", "5"])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["drift-sim", "--scenario", "lan-noisy", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert seen == [(5, 6, 10, False), (5, 8, 8, False), (5, None, None, False),
                    (2, None, None, True)]
    res = CliRunner().invoke(main, ["drift-sim", "--scenario", "lan-reference", "--minpoll", "8",
                                    "--maxpoll", "6"])
    _assert_refused(res, "--minpoll")


def test_no_python_internals_in_number_errors() -> None:
    res = CliRunner().invoke(main, ["guest", "--software-freq-ppm", "abc"])
    _assert_refused(res, "--software-freq-ppm")
    assert "could not convert" not in res.output and "'abc' is not a number" in res.output
