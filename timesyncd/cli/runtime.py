"""Run a service on the best event loop, stopping cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


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
    """Run ``main(stop_event)``; the event is set on SIGINT/SIGTERM so ``main`` can shut down."""

    async def wrapper() -> Any:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, stop.set)
        try:
            return await main(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                running.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(wrapper())


def serve_until_signal(make: Callable[[], Service], loop: str = "auto",
                       on_started: Callable[[], None] | None = None) -> None:
    """Create the service inside the loop, start it, and stop it on SIGINT/SIGTERM."""

    async def serve(stop: asyncio.Event) -> None:
        service = make()
        await service.start()
        if on_started is not None:
            on_started()
        try:
            await stop.wait()
        finally:
            await service.stop()

    run_until_signal(serve, loop)
