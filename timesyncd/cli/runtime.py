"""Run a service on the best event loop until SIGINT/SIGTERM/SIGHUP, or until it fails on its
own. SIGHUP stops cleanly, as chronyd treats it: there is no runtime reload, since reloading
trust or NTS settings would widen what a signal can change. Every stop logs one line naming
its cause."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import click

log = logging.getLogger("timesync")

#: signals that stop a service cleanly (sockets removed, state logged)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopEvent(asyncio.Event):
    """Set by a stop signal; ``cause`` names it (``SIGTERM``...) for the stop log line."""

    def __init__(self) -> None:
        super().__init__()
        self.cause: str | None = None

    def trigger(self, cause: str) -> None:
        if self.cause is None:
            self.cause = cause
        self.set()


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@runtime_checkable
class Supervised(Protocol):
    """A service that can fail on its own after starting (the guest, when the clock refuses a
    write): without this the process would linger, doing nothing, until a signal came."""

    async def wait_failed(self) -> BaseException:
        """Return (not raise) the fatal error once the service stopped working."""
        ...


class ServiceFailed(click.ClickException):
    """The service failed on its own (``__cause__`` is its error): exit status 1."""


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[Any]], loop: str = "auto"
) -> Any:
    """Run ``main(stop_event)``; the event (a :class:`StopEvent`) is set on SIGINT, SIGTERM
    or SIGHUP so ``main`` can shut down."""

    async def wrapper() -> Any:
        stop = StopEvent()
        running = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            running.add_signal_handler(sig, stop.trigger, sig.name)
        try:
            return await main(stop)
        finally:
            for sig in STOP_SIGNALS:
                running.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(wrapper())


async def _until_stopped_or_failed(service: Service, stop: asyncio.Event) -> BaseException | None:
    """Wait for ``stop`` or, for a :class:`Supervised` service, its fatal error (returned)."""
    if not isinstance(service, Supervised):
        await stop.wait()
        return None
    stopped = asyncio.create_task(stop.wait(), name="serve-stop")
    failed = asyncio.create_task(service.wait_failed(), name="serve-failed")
    try:
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopped, failed):
            task.cancel()
        await asyncio.gather(stopped, failed, return_exceptions=True)
    if not failed.done() or failed.cancelled():
        return None
    return failed.exception() or failed.result()  # a wait_failed that raised failed too


def serve_until_signal(make: Callable[[], Service], loop: str = "auto",
                       on_started: Callable[[], None] | None = None) -> None:
    """Create the service inside the loop, start it, and stop it on SIGINT/SIGTERM.

    A :class:`Supervised` service that fails on its own is stopped too, and
    :class:`ServiceFailed` is raised so the command exits non-zero.
    """

    async def serve(stop: asyncio.Event) -> None:
        service = make()
        try:
            await service.start()
        except OSError as exc:  # cannot listen, connect or touch the clock: say so, exit 1
            await service.stop()
            raise ServiceFailed(f"cannot start: {exc}") from exc
        if on_started is not None:
            on_started()
        fatal: BaseException | None = None
        try:
            fatal = await _until_stopped_or_failed(service, stop)
        finally:
            cause = (f"a fatal error: {fatal}" if fatal is not None
                     else f"{getattr(stop, 'cause', None) or 'a stop request'} received"
                     if stop.is_set() else "an interruption")
            log.log(logging.ERROR if fatal is not None else logging.INFO, "stopping on %s", cause)
            await service.stop()
        if fatal is not None:
            raise ServiceFailed(f"stopped after a fatal error: {fatal}") from fatal

    run_until_signal(serve, loop)
