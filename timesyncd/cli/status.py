"""``timesync status`` and ``timesync wait-sync``: read the guest daemon's status socket."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from guest_client.status_server import DEFAULT_STATUS_SOCKET, query_status


def _fmt(value: Any, unit: str = "s", scale: float = 1.0, digits: int = 9) -> str:
    if value is None:
        return "-"
    return f"{value * scale:+.{digits}f} {unit}"


def format_status(st: dict[str, Any]) -> str:
    """Human view, like ``chronyc tracking`` followed by ``chronyc sources``."""
    last = st.get("last_update")
    age = f"{time.time() - last:.1f} s ago" if last else "never"
    lines = [
        f"State           : {st.get('state')}"
        + (f" ({st['state_reason']})" if st.get("state_reason") else ""),
        f"Error bound     : {_fmt(st.get('error_bound_s'))}"
        + ("" if st.get("bound_verified", True) else " (unverified since a link loss)"),
        f"Offset          : {_fmt(st.get('offset_s'))} (guest minus reference)",
        f"Frequency       : {_fmt(st.get('frequency_ppm'), 'ppm', digits=3)} (native rate error)",
        f"Root distance   : {_fmt(st.get('root_distance_s'))}",
        f"Poll interval   : {st.get('poll_s')} s",
        f"Last update     : {age}",
        f"Steps           : {st.get('steps')}",
        f"Refused jumps   : {st.get('refused_jumps')}",
    ]
    if st.get("true_offset_s") is not None:
        lines.append(f"True offset     : {_fmt(st['true_offset_s'])} (software clock vs machine)")
    if st.get("holdover_s"):
        lines.append(f"Holdover        : {st['holdover_s']:.0f} s")
    relay = st.get("relay")
    if relay:
        errors = relay.get("errors") or {}
        lines.append(
            f"Relay link      : {relay.get('address')} "
            f"{'connected' if relay.get('connected') else 'DOWN'}, {relay.get('connects')} "
            f"connects; " + (", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
                             or "no errors"))
        if relay.get("last_error"):
            lines.append(f"    last error: {relay['last_error']}")
    rejected = st.get("rejected") or {}
    lines.append("Rejected        : " + (
        ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none"))
    lines.append("")
    lines.append(f"{'source':44} {'sel':3} {'auth':4} {'offset':>13} {'delay':>11} {'samples':>7}")
    for src in st.get("sources", []):
        off = src.get("offset_s")
        delay = src.get("delay_s")
        lines.append(
            f"{src.get('name', '?')[:44]:44} {'*' if src.get('selected') else ' ':3} "
            f"{'yes' if src.get('authenticated') else 'no':4} "
            f"{'-' if off is None else f'{off * 1e6:+.1f}us':>13} "
            f"{'-' if delay is None else f'{delay * 1e6:.1f}us':>11} {src.get('samples', 0):>7}"
        )
        if src.get("note"):
            lines.append(f"    note: {src['note']}")
        if src.get("rejected"):
            lines.append("    rejected: " + ", ".join(
                f"{k}={v}" for k, v in sorted(src["rejected"].items())))
    return "\n".join(lines)


@click.command("status")
@click.option("--socket", "socket_path", default=DEFAULT_STATUS_SOCKET, show_default=True,
              help="The guest daemon's status socket.")
@click.option("--relay", "relay_metrics", default=None, metavar="tcp:HOST:PORT",
              help="Instead, ask a relay's metrics address (its --metrics) for every "
                   "connected guest's state, as a table.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for an answer.")
def status(socket_path: str, relay_metrics: str | None, as_json: bool, timeout: float) -> None:
    """Show the guest daemon's synchronisation state (or, with --relay, every guest's)."""
    if relay_metrics is not None:
        _relay_status(relay_metrics, as_json, timeout)
        return
    try:
        st = query_status(socket_path, timeout)
    except OSError as exc:
        raise click.ClickException(
            f"cannot read status from {socket_path}: {exc}; is `timesync guest` running with "
            f"--status-socket {socket_path}?") from exc
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


def _relay_status(address: str, as_json: bool, timeout: float) -> None:
    from host_relay.relay_query import RelayQueryError, format_relay_status, query_relay

    try:
        doc = query_relay(address, timeout)
    except RelayQueryError as exc:
        raise click.ClickException(
            f"{exc}; is `timesync relay` running with --metrics {address}?") from exc
    click.echo(json.dumps(doc, indent=2) if as_json else format_relay_status(doc))


@click.command("wait-sync")
@click.option("--socket", "socket_path", default=DEFAULT_STATUS_SOCKET, show_default=True,
              help="The guest daemon's status socket.")
@click.option("--max-offset", default=0.01, show_default=True, type=float,
              help="Seconds: synchronised with an error bound (or, from an older daemon, an "
                   "|offset|) within this counts as done.")
@click.option("--timeout", default=60.0, show_default=True, type=float,
              help="Seconds to wait before giving up (exit 1).")
@click.option("--interval", default=0.5, show_default=True, type=float, help="Polling interval.")
def wait_sync(socket_path: str, max_offset: float, timeout: float, interval: float) -> None:
    """Exit 0 once synchronised with an error bound within --max-offset, 1 on timeout (for
    units and entrypoints)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            st = query_status(socket_path, min(2.0, max(0.1, deadline - time.monotonic())))
            offset = st.get("offset_s")
            bound = st.get("error_bound_s")  # around the clock reading; older daemons lack it
            error = bound if bound is not None else None if offset is None else abs(offset)
            synced = st.get("state") == "synchronised"
            if synced and error is not None and error <= max_offset:
                click.echo(f"synchronised: offset {offset:+.6f} s, error bound {error:.6f} s")
                return
            last = (f"state {st.get('state')} ({st.get('state_reason', '-')}), offset "
                    f"{offset}, error bound {bound}")
        except OSError as exc:
            last = f"status socket: {exc}"
        if time.monotonic() >= deadline:
            click.echo(f"not synchronised within {timeout} s ({last})", err=True)
            raise SystemExit(1)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


@click.command("makestep")
@click.option("--socket", "socket_path", required=True,
              help="The guest daemon's control socket (its --control-socket).")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
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
