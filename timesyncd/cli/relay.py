"""``timesync relay``: the host relay service."""

from __future__ import annotations

from typing import Any

import click

from host_relay.settings import RelaySettings
from timesyncd import sched
from timesyncd.cli.options import build_settings, settings_options
from timesyncd.cli.runtime import serve_until_signal


@click.command()
@click.option("--config", type=click.Path(dir_okay=False), show_default="none",
              help="TOML file ([relay] table).")
@settings_options(RelaySettings)
@click.pass_context
def relay(ctx: click.Context, config: str | None, **flags: Any) -> None:
    """Run the host relay: NTP over vsock/Unix sockets to allowlisted upstreams."""
    from host_relay.service import RelayService

    settings = build_settings(RelaySettings, config, "relay", flags)
    sched.apply(settings.sched_priority, settings.lock_memory, "relay")
    serve_until_signal(lambda: RelayService(settings), (ctx.obj or {}).get("loop", "auto"))
