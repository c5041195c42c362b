"""The one I/O module of the NTS package: drive an :class:`NtsKeSession` over an asyncio stream.

Works over any asyncio byte stream, e.g. a direct TCP connection to an NTS-KE server (the
guest daemon drives the same sans-IO session over the relay's STREAM_* frames itself, in
``guest_client.nts_manager``); the caller bounds the whole exchange with a timeout.
"""

from __future__ import annotations

import asyncio

from timesyncd.nts.ke import KeError
from timesyncd.nts.ke_session import NtsKeResult, NtsKeSession

_READ_CHUNK = 16384


async def nts_ke_over_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: NtsKeSession
) -> NtsKeResult:
    """Run ``session`` to completion; raise :class:`~timesyncd.nts.ke.KeError` on failure.

    The writer is closed on return or error, so no connection outlives the exchange.
    """
    try:
        writer.write(session.start())
        await writer.drain()
        while session.result is None:
            data = await reader.read(_READ_CHUNK)
            out = session.receive_data(data) if data else session.receive_eof()
            if out:
                writer.write(out)
                await writer.drain()
        return session.result
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def nts_ke_tcp(host: str, port: int, session: NtsKeSession,
                     timeout_s: float = 10.0) -> NtsKeResult:
    """Connect to ``host:port`` over TCP and run ``session`` within ``timeout_s``.

    Every failure is a :class:`KeError`: network problems become ``connect_failed``,
    ``io_error`` or ``timeout`` so callers count all NTS-KE failures the same way.
    """

    async def run() -> NtsKeResult:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise KeError("connect_failed", f"{host}:{port}: {exc}") from exc
        try:
            return await nts_ke_over_stream(reader, writer, session)
        except OSError as exc:
            raise KeError("io_error", f"{host}:{port}: {exc}") from exc

    try:
        return await asyncio.wait_for(run(), timeout_s)
    except TimeoutError:
        raise KeError("timeout", f"{host}:{port}: no NTS-KE result in {timeout_s} s") from None
