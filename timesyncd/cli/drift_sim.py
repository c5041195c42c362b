"""``timesync drift-sim``: what a drifting guest clock does to time-sensitive tokens."""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import replace
from typing import Any, TextIO

import click

from sim.load import make_load
from sim.report import StrategyResult, write_csv, write_plot, write_tables
from sim.runner import run_scenario
from sim.scenario import (
    STRATEGIES,
    NetworkParams,
    Scenario,
    parse_duration,
    parse_outage,
    parse_seeds,
)
from sim.summary import check_outputs, seed_summary, write_seed_summary
from sim.tokens import TokenConfig
from timesyncd.cli.options import Float, Int

DAY_S = 86400.0
MAX_DAYS = 3660.0  # ten years of virtual time; longer runs are a typo, not a study
MAX_TOKEN_RATE = 100.0
#: options only the default scenario uses: given with another scenario they are an error
#: (--minpoll/--maxpoll are accepted with lan-reference: it is to honour them)
DEFAULT_SCENARIO_ONLY = ("days", "load_spec", "leeway", "transit", "backdate", "token_rate",
                         "load_coupling", "strategies", "vsock_delay", "vsock_jitter",
                         "vsock_queue", "upstream_delay", "upstream_jitter", "asymmetry", "loss",
                         "outages", "csv_path", "plot_path", "host_load", "relay_sched",
                         "relay_user_stamps")
_NET_DEFAULTS = NetworkParams()
_TOK_DEFAULTS = TokenConfig()
_SC_DEFAULTS = Scenario()


class _Progress:
    """Progress on stderr after the first second: a one-line bar on a terminal, else a plain
    line at most every :attr:`LINE_EVERY_S` (logs and CI show a long run is alive); never on
    stdout, so ``--json`` stays clean."""

    LINE_EVERY_S = 5.0

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.done = total, 0
        self.started = time.monotonic()
        self.last_line = 0.0
        self.shown = False

    def __call__(self, label: str, fraction: float) -> None:
        if fraction == 0.0:
            self.done += 1  # a new strategy (or seed) starts
        now = time.monotonic()
        if now - self.started <= 1.0:
            return
        overall = (self.done - 1 + fraction) / max(self.total, 1)
        if self.tty:
            width = 30
            filled = int(width * overall)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} {label:<12}")
            self.stream.flush()
            self.shown = True
        elif now - self.last_line >= self.LINE_EVERY_S:
            self.last_line = now
            self.stream.write(f"drift-sim: {overall:4.0%} done, run {self.done}/{self.total} "
                              f"{label} {fraction:.0%}, {now - self.started:.0f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


def _strategies(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise click.BadParameter(f"{','.join(bad) or text!r}; choose from {','.join(STRATEGIES)}",
                                 param_hint="--strategies")
    return names


@click.command("drift-sim")
@click.option("--days", type=Float(0, MAX_DAYS, min_open=True), default=_SC_DEFAULTS.days,
              show_default=True, help="Simulated days (default scenario only).")
@click.option("--load", "load_spec", default="diurnal", show_default=True,
              metavar="constant[:RPS]|diurnal|bursty|PATH.csv",
              help="Guest traffic profile (CSV format: docs/SIMULATOR.md).")
@click.option("--seed", type=Int(0, 2**32 - 1), default=1, show_default=True,
              help="Random seed: the same seed gives the same run.")
@click.option("--seeds", default=None, metavar="A-B", show_default="--seed only",
              help="Run several seeds instead of --seed, e.g. 1-10 or 1,3,5.")
@click.option("--leeway", type=Float(0, DAY_S), default=_TOK_DEFAULTS.jwt_leeway_s,
              show_default=True, help="JWT leeway, seconds.")
@click.option("--transit", type=Float(0, DAY_S), default=_TOK_DEFAULTS.transit_s,
              show_default=True, help="Token issue-to-validation delay, seconds.")
@click.option("--backdate", type=Int(0, 366 * 86400), default=_TOK_DEFAULTS.x509_backdate_s,
              show_default=True, help="X.509 notBefore backdate, seconds.")
@click.option("--token-rate", type=Float(0, MAX_TOKEN_RATE), default=_TOK_DEFAULTS.rate_per_s,
              show_default=f"{_TOK_DEFAULTS.rate_per_s:.4g} /s (one a minute)",
              help="Tokens issued per second, per kind.")
@click.option("--load-coupling", type=Float(-10_000, 10_000),
              default=_SC_DEFAULTS.load_coupling_ppm,
              show_default=True, help="Extra rate error at full load, ppm.")
@click.option("--strategies", "strategies", default=",".join(STRATEGIES), show_default=True,
              help="Comma list of none,step,discipline.")
@click.option("--minpoll", type=Int(-2, 17), default=_SC_DEFAULTS.minpoll,
              show_default=True, help="discipline: minimum poll, log2 seconds.")
@click.option("--maxpoll", type=Int(-2, 17), default=_SC_DEFAULTS.maxpoll,
              show_default=True, help="discipline: maximum poll, log2 seconds.")
@click.option("--vsock-delay", type=Float(0, 60), default=_NET_DEFAULTS.vsock_delay_s,
              show_default=True, help="vsock one-way base delay, s.")
@click.option("--vsock-jitter", type=Float(0, 60),
              default=_NET_DEFAULTS.vsock_jitter_s, show_default=True,
              help="vsock exponential jitter mean, s.")
@click.option("--vsock-queue", type=Float(0, 60), default=_NET_DEFAULTS.vsock_queue_s,
              show_default=True, help="vsock queueing mean at full load, s.")
@click.option("--upstream-delay", type=Float(0, 60),
              default=_NET_DEFAULTS.upstream_delay_s, show_default=True,
              help="relay-upstream one-way delay, s.")
@click.option("--upstream-jitter", type=Float(0, 60),
              default=_NET_DEFAULTS.upstream_jitter_s, show_default=True,
              help="relay-upstream jitter mean, s.")
@click.option("--asymmetry", type=Float(-60, 60), default=0.0, show_default=True,
              help="Extra outbound minus return delay, s.")
@click.option("--loss", type=Float(0, 1, max_open=True), default=0.0,
              show_default=True, help="Packet loss probability per message.")
@click.option("--outage", "outages", multiple=True, metavar="START:DURATION",
              show_default="none",
              help="Relay down, e.g. 2d:6h (units s/m/h/d). Repeatable.")
@click.option("--host-load", default="", show_default="none (idle host)",
              help="Host CPU load profile, same syntax as --load (constant:1000 = all CPUs "
                   "busy): wakes the relay and the guest's vCPU late (see --relay-sched).")
@click.option("--relay-sched", type=Float(0, 60), default=0.0, show_default=True,
              help="Mean scheduling wait per process wake-up at host utilisation 1, s.")
@click.option("--relay-user-stamps", is_flag=True,
              help="Model the relay before kernel receive stamps (issue 18): the wait for "
                   "the relay to read an upstream reply is hidden return-path delay.")
@click.option("--scenario", "scenario_name",
              type=click.Choice(["default", "lan-reference", "lan-noisy", "snapshot-restore"]),
              default="default", show_default=True,
              help="lan-reference: chrony's simulation model (honours --minpoll/--maxpoll, "
              "16 s when not given); lan-noisy: the same on a slow path (0.5 ms + 2 ms "
              "exponential each way); snapshot-restore: a paused guest resumed (--pause, "
              "--pause-at, --vmclock).")
@click.option("--pause", "pause", default="2h", show_default=True, metavar="DURATION",
              help="snapshot-restore: how long the guest stays paused (units s/m/h/d).")
@click.option("--pause-at", "pause_at", default="1h", show_default=True, metavar="DURATION",
              help="snapshot-restore: when the snapshot is taken, after start.")
@click.option("--vmclock/--no-vmclock", default=True, show_default=True,
              help="snapshot-restore: a VMClock device reports the restore (disruption marker).")
@click.option("--json", "as_json", is_flag=True, help="Write results as JSON to stdout.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              show_default="none",
              help="Write the offset time series to this CSV file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              show_default="none",
              help="Plot offsets (PNG; needs matplotlib).")
def drift_sim(days: float, load_spec: str, seed: int, seeds: str | None, leeway: float,
              transit: float, backdate: int, token_rate: float, load_coupling: float,
              strategies: str, minpoll: int, maxpoll: int, vsock_delay: float,
              vsock_jitter: float, vsock_queue: float, upstream_delay: float,
              upstream_jitter: float, asymmetry: float, loss: float, outages: tuple[str, ...],
              host_load: str, relay_sched: float, relay_user_stamps: bool,
              scenario_name: str, pause: str, pause_at: str, vmclock: bool, as_json: bool,
              csv_path: str | None, plot_path: str | None) -> None:
    """Simulate a drifting guest clock under none/step/discipline and count broken tokens.

    Defaults: 7 days, diurnal traffic, all strategies, JWT/X.509/TOTP tokens (docs/SIMULATOR.md).
    """
    given = _given(click.get_current_context())
    if "seed" in given and "seeds" in given:
        raise click.UsageError("--seed and --seeds: give one (--seeds runs several seeds)")
    unused = [f"--{n.removesuffix('_spec').removesuffix('_path').replace('_', '-')}"
              for n in DEFAULT_SCENARIO_ONLY if n in given and scenario_name != "default"
              and not (scenario_name == "snapshot-restore" and n in ("leeway", "token_rate"))]
    unused += [f"--{n.replace('_', '-')}" for n in ("pause", "pause_at", "vmclock")
               if n in given and scenario_name != "snapshot-restore"]
    unused = [u if u != "--outages" else "--outage" for u in unused]
    if unused:
        raise click.UsageError(f"--scenario {scenario_name}: {', '.join(unused)} not used by "
                               "this scenario (it has its own fixed model); drop them")
    try:
        seed_list = parse_seeds(seeds) if seeds else [seed]
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("seeds: "), param_hint="--seeds") from None
    if scenario_name == "snapshot-restore":
        _snapshot_restore(seed_list, seeds is not None, pause, pause_at, vmclock, leeway,
                          token_rate, as_json)
        return
    if scenario_name in ("lan-reference", "lan-noisy"):
        _lan_reference(seed_list, seeds is not None, as_json,
                       minpoll if "minpoll" in given else None,
                       maxpoll if "maxpoll" in given else None, scenario_name == "lan-noisy")
        return
    spans = tuple(_outage(text, days) for text in outages)
    _check_load(load_spec, seed_list[0], days)
    if host_load:
        _check_load(host_load, seed_list[0], days, "--host-load")
    try:
        net = NetworkParams(vsock_delay, vsock_jitter, vsock_queue, upstream_delay,
                            upstream_jitter, asymmetry, loss, spans, host_load=host_load,
                            relay_sched_s=relay_sched,
                            relay_kernel_stamps=not relay_user_stamps)
        tokens = replace(_TOK_DEFAULTS, jwt_leeway_s=leeway, transit_s=transit,
                         x509_backdate_s=backdate, rate_per_s=token_rate)
        base = Scenario(days=days, seed=seed_list[0], load=load_spec,
                        strategies=_strategies(strategies), load_coupling_ppm=load_coupling,
                        minpoll=minpoll, maxpoll=maxpoll, network=net, tokens=tokens)
        check_outputs(csv_path, plot_path)  # before a run that can take minutes
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    progress = _Progress(len(seed_list) * len(base.strategies))
    runs: dict[int, tuple[Scenario, dict[str, StrategyResult]]] = {}
    try:
        for s in seed_list:
            sc = base.with_seed(s)
            runs[s] = (sc, run_scenario(sc, progress=progress))
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.close()
    _emit(runs, seeds is not None, as_json, csv_path, plot_path)


def _check_load(spec: str, seed: int, days: float, hint: str = "--load") -> None:
    """Build the profile once now, so a bad ``--load`` is a usage error before any run."""
    try:
        make_load(spec, seed=seed, horizon_s=days * DAY_S)
    except OSError as exc:
        raise click.BadParameter(f"{spec}: {exc.strerror or exc}", param_hint=hint) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("load: "), param_hint=hint) from None


def _outage(text: str, days: float) -> tuple[float, float]:
    """One ``--outage START:DURATION``, refused unless it falls inside the run."""
    try:
        start, length = parse_outage(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: {exc}", param_hint="--outage") from None
    if length <= 0:
        raise click.BadParameter(f"{text!r} has no duration", param_hint="--outage")
    if start >= days * DAY_S:
        raise click.BadParameter(f"{text!r} starts after the end of the run ({days:g} days)",
                                 param_hint="--outage")
    return start, length


def _given(ctx: click.Context) -> set[str]:
    """Parameters the user typed (not defaults): combinations are judged on these."""
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}


def _doc(sc: Scenario, results: dict[str, StrategyResult]) -> dict[str, Any]:
    return {"scenario": sc.to_json(),
            "strategies": {name: r.to_json() for name, r in results.items()}}


def _emit(runs: dict[int, tuple[Scenario, dict[str, StrategyResult]]], multi: bool,
          as_json: bool, csv_path: str | None, plot_path: str | None) -> None:
    summary = seed_summary({s: r for s, (_, r) in runs.items()}) if multi else None
    if as_json:
        doc = ({"seeds": {str(s): _doc(sc, r) for s, (sc, r) in runs.items()},
                "summary": summary} if multi else _doc(*next(iter(runs.values()))))
        click.echo(json.dumps(doc, indent=2))
    else:
        for s, (sc, results) in runs.items():
            out = io.StringIO()
            write_tables(results, out, f"drift-sim: {sc.days:g} days, load {sc.load}, seed {s}, "
                         f"JWT leeway {sc.tokens.jwt_leeway_s:g} s, transit "
                         f"{sc.tokens.transit_s:g} s, X.509 backdate {sc.tokens.x509_backdate_s} s")
            click.echo(out.getvalue(), nl=False)
        if summary is not None:
            out = io.StringIO()
            write_seed_summary(summary, out)
            click.echo(out.getvalue(), nl=False)
    first_sc, first = next(iter(runs.values()))
    try:
        if csv_path:
            write_csv(first, csv_path)
        if plot_path:
            write_plot(first, plot_path, f"drift-sim: {first_sc.days:g} days, load "
                       f"{first_sc.load}, seed {first_sc.seed}")
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _snapshot_restore(seed_list: list[int], multi: bool, pause: str, pause_at: str,
                      vmclock: bool, leeway: float, token_rate: float, as_json: bool) -> None:
    """One report per seed; with ``--seeds`` (``multi``) also the median and worst over them,
    as the default scenario does."""
    from sim.restore import (
        RestoreScenario,
        format_restore,
        format_restore_summary,
        restore_summary,
        run_restore,
    )

    try:
        base = RestoreScenario(pause_s=parse_duration(pause), at_s=parse_duration(pause_at),
                               vmclock=vmclock, seed=seed_list[0], leeway_s=leeway,
                               token_rate=token_rate)
    except ValueError as exc:
        raise click.UsageError(f"--pause/--pause-at: {exc}") from None
    docs = {s: run_restore(replace(base, seed=s)) for s in seed_list}
    if not multi:
        doc = docs[seed_list[0]]
        click.echo(json.dumps(doc, indent=2) if as_json else format_restore(doc))
        return
    summary = restore_summary(docs)
    if as_json:
        click.echo(json.dumps({"seeds": {str(s): d for s, d in docs.items()},
                               "summary": summary}, indent=2))
        return
    for doc in docs.values():
        click.echo(format_restore(doc, show_seed=True) + "\n")
    click.echo(format_restore_summary(summary))


def _lan_reference(seed_list: list[int], multi: bool, as_json: bool, minpoll: int | None,
                   maxpoll: int | None, noisy: bool) -> None:
    """chrony's model at the given polls (each defaults to the other, then to 16 s)."""
    from sim.runner import run_lan_reference

    lo = minpoll if minpoll is not None else maxpoll
    hi = maxpoll if maxpoll is not None else minpoll
    if lo is not None and hi is not None and lo > hi:
        raise click.UsageError(f"--minpoll {lo} exceeds --maxpoll {hi}: lower --minpoll")
    docs = {s: run_lan_reference(s, minpoll=lo, maxpoll=hi, noisy=noisy) for s in seed_list}
    if as_json:
        doc = {"seeds": {str(s): d for s, d in docs.items()}} if multi else docs[seed_list[0]]
        click.echo(json.dumps(doc, indent=2))
        return
    name = "lan-noisy" if noisy else "lan-reference"
    for s, d in docs.items():
        m: Any = d["strategies"]["discipline"]  # type: ignore[index]
        click.echo(f"{name} seed {s}: rms {m['rms_offset_s'] * 1e6:.1f} us, max "
                   f"{m['max_abs_offset_s'] * 1e6:.1f} us, rms freq error "
                   f"{m['rms_freq_error_ppm']:.4f} ppm, converged after "
                   f"{m['converged_after_s']} s, bound coverage {m['bound_coverage']:.6f} "
                   f"(max true/bound {m['max_true_over_bound']:.3f}), median bound "
                   f"{m['median_bound_s'] * 1e6:.1f} us; reference estimator rms "
                   f"{d['reference']['rms_offset_s'] * 1e6:.1f} us")  # type: ignore[index]
