"""The asyncio NTS-KE driver: failures are named KeErrors and never leak a connection."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from timesyncd.nts.ke import KeError
from timesyncd.nts.ke_io import nts_ke_tcp
from timesyncd.nts.ke_session import NtsKeSession

pytestmark = pytest.mark.timeout(30)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _against(handler: object, timeout_s: float) -> KeError:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(KeError) as info:
            await nts_ke_tcp("127.0.0.1", port, NtsKeSession("localhost"), timeout_s)
        return info.value
    finally:
        await asyncio.sleep(0.05)  # let the handler close its side before we count fds
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("behaviour", "reason"),
                         [("silent", "timeout"), ("close", "connection_closed"),
                          ("garbage", "tls_failed")])
def test_misbehaving_servers(behaviour: str, reason: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "garbage":
            writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 4)
        await reader.read(65536)  # the ClientHello
        if behaviour == "silent":
            await reader.read(65536)  # returns once the client gives up and closes
        writer.close()

    before = open_fds()
    error = asyncio.run(_against(handler, 0.3))
    assert error.reason == reason
    assert open_fds() == before


def test_connection_refused_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(KeError) as info:
            asyncio.run(nts_ke_tcp("127.0.0.1", port, NtsKeSession("localhost"), 2.0))
    assert info.value.reason == "connect_failed"
