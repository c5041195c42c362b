"""``timesync guest``: the guest daemon."""

from __future__ import annotations

from typing import Any

import click

from guest_client.settings import GuestSettings
from timesyncd import sched
from timesyncd.cli.options import build_settings, settings_options
from timesyncd.cli.runtime import serve_until_signal


@click.command()
@click.option("--config", type=click.Path(dir_okay=False), show_default="none",
              help="TOML file ([guest] table).")
@settings_options(GuestSettings)
@click.pass_context
def guest(ctx: click.Context, config: str | None, **flags: Any) -> None:
    """Run the guest daemon: discipline this guest's clock by slewing."""
    from guest_client.daemon import GuestDaemon, make_clock

    settings = build_settings(GuestSettings, config, "guest", flags)
    try:
        clock = make_clock(settings)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    sched.apply(settings.sched_priority, settings.lock_memory, "guest")
    serve_until_signal(lambda: GuestDaemon(settings, clock), (ctx.obj or {}).get("loop", "auto"))
