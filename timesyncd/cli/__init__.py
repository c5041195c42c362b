"""The ``timesync`` command line: one subcommand per job. The only module that imports every
package (core, relay, guest, simulator).

Subcommands are imported when they run, not at start-up: a guest daemon in an enclave should
not carry the simulator's or the relay's imports in its memory.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from timesyncd import __version__
from timesyncd.logs import configure_logging

#: subcommand -> "module:attribute"
COMMANDS = {
    "relay": "timesyncd.cli.relay:relay",
    "guest": "timesyncd.cli.guest:guest",
    "status": "timesyncd.cli.status:status",
    "wait-sync": "timesyncd.cli.status:wait_sync",
    "makestep": "timesyncd.cli.status:makestep",
    "now": "timesyncd.cli.now:now",
    "demo": "timesyncd.cli.demo:demo",
    "drift-sim": "timesyncd.cli.drift_sim:drift_sim",
}


LOG_LEVELS = ["debug", "info", "warning", "error"]
LOOPS = ["auto", "uvloop", "asyncio"]


def _global_after(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the subcommand: it overrides the one before (if any)."""
    if value is None or param.name is None:
        return
    obj = ctx.find_root().obj
    if not isinstance(obj, dict):
        return
    obj[param.name] = value
    if param.name in ("log_level", "log_json"):
        configure_logging(obj["log_level"], obj["log_json"])


def _global_options() -> list[click.Option]:
    """The group's options, also accepted after any subcommand (``timesync guest --log-level
    debug``), as users of systemd units and containers append them."""
    return [
        click.Option(["--log-level"], type=click.Choice(LOG_LEVELS), default=None,
                     expose_value=False, callback=_global_after,
                     help="As `timesync --log-level` (global option, accepted here too)."),
        click.Option(["--log-json"], is_flag=True, default=None, expose_value=False,
                     callback=_global_after, help="As `timesync --log-json`."),
        click.Option(["--loop"], type=click.Choice(LOOPS), default=None, expose_value=False,
                     callback=_global_after, help="As `timesync --loop`."),
    ]


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and accept the global options."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            module, _, attr = COMMANDS[cmd_name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            names = {n for p in command.params for n in p.opts}
            command.params.extend(o for o in _global_options() if o.opts[0] not in names)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="timesync")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS),
              help="Log messages of this level and above (also accepted after the subcommand).")
@click.option("--log-json", is_flag=True, help="Log as JSON lines (one object per line).")
@click.option("--loop", default="auto", show_default=True, type=click.Choice(LOOPS),
              help="Event loop for services (auto: uvloop when installed).")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_json: bool, loop: str) -> None:
    """Time synchronisation for confidential-computing guests (Nitro Enclaves, Firecracker).

    Global options may also follow the subcommand: `timesync guest --log-level debug ...`.
    """
    configure_logging(log_level, log_json)
    ctx.obj = {"loop": loop, "log_level": log_level, "log_json": log_json}

