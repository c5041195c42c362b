"""The ``timesync`` command line: one subcommand per job. The only module that imports every
package (core, relay, guest, simulator)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import click

from guest_client.settings import GuestSettings
from host_relay.settings import RelaySettings
from timesyncd import __version__
from timesyncd.cli.demo import demo
from timesyncd.cli.drift_sim import drift_sim
from timesyncd.cli.options import build_settings, settings_options
from timesyncd.cli.runtime import run_until_signal
from timesyncd.cli.status import status, wait_sync
from timesyncd.logs import configure_logging

log = logging.getLogger("timesync")



@click.group()
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


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file ([relay] table).")
@settings_options(RelaySettings)
@click.pass_context
def relay(ctx: click.Context, config: str | None, **flags: Any) -> None:
    """Run the host relay: NTP over vsock/Unix sockets to allowlisted upstreams."""
    from host_relay.service import RelayService

    settings = build_settings(RelaySettings, config, "relay", flags)

    async def serve(stop: asyncio.Event) -> None:
        service = RelayService(settings)
        await service.start()
        log.info("relay listening on %s; upstreams: %s", ", ".join(settings.listen),
                 ", ".join(settings.upstreams) or "host clock (local stratum)")
        try:
            await stop.wait()
        finally:
            await service.stop()

    run_until_signal(serve, ctx.obj["loop"])


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file ([guest] table).")
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

    async def serve(stop: asyncio.Event) -> None:
        daemon = GuestDaemon(settings, clock)
        await daemon.start()
        try:
            await stop.wait()
        finally:
            await daemon.stop()

    run_until_signal(serve, ctx.obj["loop"])


main.add_command(status)
main.add_command(wait_sync)
main.add_command(demo)
main.add_command(drift_sim)
