"""Generic asyncio helpers shared by the guest and the relay (no protocol logic here)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_task(task: asyncio.Task[None], tries: int = 5) -> None:
    """Cancel ``task`` and wait for it, re-cancelling should one cancel be swallowed."""
    for _ in range(tries):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()
