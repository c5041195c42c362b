"""``timesync status`` and ``timesync wait-sync``: read the guest daemon's status socket."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from typing import Any

import click

from guest_client.status_server import DEFAULT_STATUS_SOCKET, StatusError, query_status
from timesyncd.cli.options import Float
from timesyncd.status_report import StatusReport
from timesyncd.status_view import format_status, human

__all__ = ["format_status", "status", "wait_sync"]

#: errors waiting cannot fix: wait-sync reports them at once (exit 3) instead of retrying
PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTSOCK, errno.ENOTDIR, errno.ELOOP,
                    errno.ENAMETOOLONG, errno.EPROTOTYPE}
EXIT_TIMEOUT, EXIT_PERMANENT = 1, 3


class Permanent(click.ClickException):
    """Waiting cannot fix this (exit 3, like a missing permission)."""

    exit_code = EXIT_PERMANENT


def _read(path: str, timeout: float) -> dict[str, Any]:
    """One status answer; :class:`Permanent` for what retrying cannot fix, else ``OSError``."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise Permanent(f"{path} is not a socket; give the guest's --status-socket")
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in PERMANENT_ERRNOS:
            raise Permanent(f"cannot read status from {path}: {exc.strerror}") from exc
        raise
    try:
        return query_status(path, timeout)
    except StatusError as exc:
        if "busy" in str(exc):
            raise
        raise Permanent(f"{exc}; is {path} the status socket of `timesync guest`?") from exc
    except OSError as exc:
        if exc.errno in PERMANENT_ERRNOS:
            raise Permanent(f"cannot read status from {path}: {exc.strerror}") from exc
        raise


@click.command("status")
@click.option("--socket", "socket_path", default=DEFAULT_STATUS_SOCKET, show_default=True,
              help="The guest daemon's status socket.")
@click.option("--relay", "relay_metrics", default=None, metavar="tcp:HOST:PORT",
              show_default="off: read the guest's status socket",
              help="Instead, ask a relay's metrics address (its --metrics) for every "
                   "connected guest's state, as a table.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@click.option("-v", "--verbose", is_flag=True, help="Explain the sources table's columns.")
@click.option("--wide", is_flag=True, help="Source names on one line, however long "
              "(default: long names wrap).")
@click.option("--timeout", type=Float(0, 3600, min_open=True), default=2.0, show_default="2 s",
              help="Seconds to wait for an answer.")
def status(socket_path: str, relay_metrics: str | None, as_json: bool, verbose: bool,
           wide: bool, timeout: float) -> None:
    """Show the guest daemon's synchronisation state (or, with --relay, every guest's)."""
    if relay_metrics is not None:
        _relay_status(relay_metrics, as_json, timeout)
        return
    try:
        st = _read(socket_path, timeout)
    except Permanent as exc:  # no hint to start the daemon: that is not the problem
        raise click.ClickException(exc.message) from exc
    except OSError as exc:
        raise click.ClickException(
            f"cannot read status from {socket_path}: {exc.strerror or exc}; is `timesync "
            f"guest` running with --status-socket {socket_path}?") from exc
    click.echo(json.dumps(st, indent=2) if as_json
               else format_status(StatusReport.from_json(st), wide=wide, verbose=verbose))


def _relay_status(address: str, as_json: bool, timeout: float) -> None:
    from host_relay.relay_query import RelayQueryError, metrics_host_port, query_relay
    from timesyncd.relay_status_view import format_relay_status

    try:
        metrics_host_port(address)
    except RelayQueryError as exc:  # a malformed address: a usage error, not a relay problem
        raise click.BadParameter(str(exc).partition(": ")[2], param_hint="--relay") from None
    try:
        doc = query_relay(address, timeout)
    except RelayQueryError as exc:
        raise click.ClickException(
            f"{exc}; is `timesync relay` running with --metrics {address}?") from exc
    click.echo(json.dumps(doc, indent=2) if as_json else format_relay_status(doc))


def _verdict(st: StatusReport, max_offset: float, max_error: float | None,
             max_correction: float | None) -> tuple[bool, str]:
    """(synchronised within every threshold, a one-line summary of this try)."""
    offset, bound, correction = st.offset_s, st.bound_s, st.remaining_correction_s
    checks = [st.state == "synchronised", offset is not None and abs(offset) <= max_offset]
    if max_error is not None:
        checks.append(bound is not None and bound <= max_error)
    if max_correction is not None:
        checks.append(correction is not None and abs(correction) <= max_correction)
    line = (f"state {st.state}, offset {human(offset, digits=3)}, error bound "
            f"{human(bound, signed=False, digits=3)}, correction {human(correction, digits=3)}")
    return all(checks), line


@click.command("wait-sync")
@click.option("--socket", "socket_path", default=DEFAULT_STATUS_SOCKET, show_default=True,
              help="The guest daemon's status socket.")
@click.option("--max-offset", type=Float(0, 3600, min_open=True), default=0.01,
              show_default="0.01 s", help="Seconds: synchronised with |offset| at most this.")
@click.option("--max-error", type=Float(0, 3600, min_open=True), default=None,
              help="Seconds: also wait until the error bound (error_bound_s, else "
                   "root_distance_s) is at most this.", show_default="not checked")
@click.option("--max-correction", type=Float(0, 3600, min_open=True), default=None,
              help="Seconds: also wait until the correction still being slewed out is at most "
                   "this (chronyc waitsync's max-correction).", show_default="not checked")
@click.option("--timeout", type=Float(0, 86400 * 7), default=60.0, show_default="60 s",
              help="Seconds to wait before giving up (exit 1); 0: one try.")
@click.option("--interval", type=Float(0.01, 3600), default=0.5, show_default="0.5 s",
              help="Seconds between tries.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line per try.")
def wait_sync(socket_path: str, max_offset: float, max_error: float | None,
              max_correction: float | None, timeout: float, interval: float,
              quiet: bool) -> None:
    """Wait until synchronised, like `chronyc waitsync` (for units and entrypoints).

    Exit status: 0 synchronised within the thresholds, 1 timed out, 2 usage error, 3 an error
    waiting cannot fix (permission denied, not a status socket), reported at once.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    tries = 0
    while True:
        tries += 1
        try:
            st = _read(socket_path, min(2.0, max(0.1, deadline - time.monotonic())))
            done, last = _verdict(StatusReport.from_json(st), max_offset, max_error,
                                  max_correction)
            if done:
                if not quiet:
                    click.echo(f"synchronised: {last}")
                return
        except OSError as exc:
            last = f"no status from {socket_path}: {exc.strerror or exc}"
        if not quiet:
            click.echo(f"try {tries}: {last}")
        if time.monotonic() >= deadline:
            click.echo(f"not synchronised within {timeout:g} s ({last})", err=True)
            raise SystemExit(EXIT_TIMEOUT)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


@click.command("makestep")
@click.option("--socket", "socket_path", required=True,
              help="The guest daemon's control socket (its --control-socket).")
@click.option("--timeout", type=Float(0, 3600, min_open=True), default=5.0, show_default="5 s",
              help="Seconds to wait for an answer.")
def makestep(socket_path: str, timeout: float) -> None:
    """Step the guest's clock now, to what its sources say (with NTS: the authenticated ones).

    For an operator who checked that a refused jump is real. Exit 1 if refused."""
    from guest_client.control_server import request_makestep

    try:
        answer = request_makestep(socket_path, timeout)
    except OSError as exc:
        raise click.ClickException(
            f"cannot reach the control socket {socket_path}: {exc}; is `timesync guest` "
            f"running with --control-socket {socket_path}?") from exc
    if answer.get("error") or not answer.get("stepped"):
        click.echo(f"not stepped: {answer.get('error') or answer.get('reason')}", err=True)
        raise SystemExit(1)
    click.echo(f"stepped the clock by {answer['offset_s']:+.9f} s ({answer['reason']})")
