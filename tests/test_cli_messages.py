"""What a user reads: defaults with units in every help, global options after the subcommand,
and no Python internals (class names, errno dumps, reprs) in messages and counter names."""

from __future__ import annotations

import asyncio
import socket

import click
import pytest
from click.testing import CliRunner

from timesyncd.cli import main
from timesyncd.transport import open_udp

COMMANDS = ["relay", "guest", "status", "wait-sync", "demo", "drift-sim"]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_a_default_for_every_valued_option(name: str) -> None:
    cmd = main.get_command(click.Context(main), name)
    assert cmd is not None
    missing = [p.opts[0] for p in cmd.params
               if isinstance(p, click.Option) and not p.is_flag and p.expose_value
               and not p.show_default]
    assert not missing, f"{name}: options without a shown default: {missing}"


def test_defaults_carry_units_and_no_float_noise() -> None:
    guest = CliRunner().invoke(main, ["guest", "--help"], terminal_width=200).output
    assert "default: (10 s)" in guest  # health_interval_s
    assert "default: (0 ppm)" in guest  # software_freq_ppm
    sim = CliRunner().invoke(main, ["drift-sim", "--help"], terminal_width=200).output
    assert "0.016666666666666666" not in sim and "0.01667 /s" in sim
    wait = CliRunner().invoke(main, ["wait-sync", "--help"], terminal_width=200).output
    assert "Seconds between tries." in wait and "default: (0.5 s)" in wait


def test_global_options_accepted_after_the_subcommand() -> None:
    res = CliRunner().invoke(main, ["status", "--log-level", "debug", "--loop", "asyncio",
                                    "--socket", "/nonexistent/x.sock", "--timeout", "0.1"])
    assert "No such option" not in res.output and res.exit_code == 1, res.output
    res = CliRunner().invoke(main, ["guest", "--log-level", "loud"])
    assert res.exit_code == 2 and "--log-level" in res.output


def test_status_relay_refuses_a_non_tcp_address_without_internals() -> None:
    res = CliRunner().invoke(main, ["status", "--relay", "unix:/run/relay.sock"])
    assert res.exit_code == 2, res.output
    assert "tcp:unix:" not in res.output and "--relay" in res.output
    res = CliRunner().invoke(main, ["status", "--relay", "tcp:127.0.0.1:1", "--timeout", "1"])
    assert res.exit_code == 1 and "[Errno" not in res.output, res.output


def test_udp_errors_are_counted_under_readable_names() -> None:
    """An ICMP port-unreachable on loopback: "connection_refused", not a class name."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now

    async def run() -> list[str]:
        errors: list[str] = []
        got = asyncio.Event()

        def on_error(reason: str) -> None:
            errors.append(reason)
            got.set()

        ep = await open_udp(f"udp:127.0.0.1:{port}", lambda data, ns: None, on_error)
        try:
            for _ in range(5):
                ep.send(b"x" * 48)
                try:
                    await asyncio.wait_for(got.wait(), 0.5)
                    break
                except TimeoutError:
                    continue
        finally:
            ep.close()
        return errors

    errors = asyncio.run(run())
    assert errors and errors[0] == "connection_refused", errors
