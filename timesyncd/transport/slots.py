"""Bounded client slots for small local servers (/metrics, the guest's status socket).

Slow clients must not hold an endpoint: a client that connects and then dribbles its request
(slowloris) or never reads its answer takes a slot, and with a fixed number of slots enough
of them lock everyone else out. Here a full table makes room by evicting a client: first the
oldest one known to be slow (it sent part of a request and stopped), else the oldest one.
A real request arrives whole right after connecting and is answered within milliseconds, so
an attacker must outpace every legitimate client to keep a slot.
"""

from __future__ import annotations

import asyncio


class ClientSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # insertion order = age; a client moves from fresh to slow when it sends a fragment
        self._fresh: dict[object, asyncio.BaseTransport] = {}
        self._slow: dict[object, asyncio.BaseTransport] = {}
        self._evicted: set[object] = set()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._fresh) + len(self._slow)

    def admit(self, key: object, transport: asyncio.BaseTransport) -> None:
        """Take a slot for ``key``, aborting other clients while the table is full (their
        pending reads end at once, so their handlers finish and release)."""
        while len(self) >= self.limit:
            table = self._slow or self._fresh
            old_key = next(iter(table))
            old = table.pop(old_key)
            self._evicted.add(old_key)
            self.evictions += 1
            old.abort()  # type: ignore[attr-defined]
        self._fresh[key] = transport

    def slow(self, key: object) -> None:
        """``key`` sent part of a request and has to be waited for: it goes first."""
        transport = self._fresh.pop(key, None)
        if transport is not None:
            self._slow[key] = transport

    def evicted(self, key: object) -> bool:
        """``key`` lost its slot to a newer client (its handler should count that)."""
        return key in self._evicted

    def release(self, key: object) -> None:
        self._fresh.pop(key, None)
        self._slow.pop(key, None)
        self._evicted.discard(key)


async def read_until(reader: asyncio.StreamReader, sep: bytes, limit: int, slots: ClientSlots,
                     key: object) -> bytes:
    """Read up to and including ``sep`` (at most ``limit`` bytes), marking the client slow in
    ``slots`` when a fragment arrives without it. Raises ``asyncio.IncompleteReadError`` at
    EOF and ``asyncio.LimitOverrunError`` past ``limit``; the caller bounds the time."""
    buf = b""
    while True:
        chunk = await reader.read(limit + 1 - len(buf))
        if not chunk:
            raise asyncio.IncompleteReadError(buf, None)
        buf += chunk
        end = buf.find(sep)
        if end >= 0:
            return buf[:end + len(sep)]
        if len(buf) > limit:
            raise asyncio.LimitOverrunError("request too long", len(buf))
        slots.slow(key)
