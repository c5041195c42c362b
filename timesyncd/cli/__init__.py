"""The ``timesync`` command line: one subcommand per job. The only module that imports every
package (core, relay, guest, simulator).

Subcommands are imported when they run, not at start-up: a guest daemon in an enclave should
not carry the simulator's or the relay's imports in its memory.
"""

from __future__ import annotations

import importlib

import click

from timesyncd import __version__
from timesyncd.logs import configure_logging

#: subcommand -> "module:attribute"
COMMANDS = {
    "relay": "timesyncd.cli.relay:relay",
    "guest": "timesyncd.cli.guest:guest",
    "status": "timesyncd.cli.status:status",
    "wait-sync": "timesyncd.cli.status:wait_sync",
    "now": "timesyncd.cli.now:now",
    "demo": "timesyncd.cli.demo:demo",
    "drift-sim": "timesyncd.cli.drift_sim:drift_sim",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            module, _, attr = COMMANDS[cmd_name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="timesync")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json", is_flag=True, help="Log as JSON lines (one object per line).")
@click.option("--loop", default="auto", show_default=True,
              type=click.Choice(["auto", "uvloop", "asyncio"]),
              help="Event loop for services (auto: uvloop when installed).")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_json: bool, loop: str) -> None:
    """Time synchronisation for confidential-computing guests (Nitro Enclaves, Firecracker)."""
    configure_logging(log_level, log_json)
    ctx.obj = {"loop": loop}

