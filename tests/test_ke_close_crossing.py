"""A KE server that closes first (ntpsec does; chronyd waits for the client): the relay's close
and the guest's cross on the wire. That is the normal end of a stream, so neither side may count
it as an error (it used to show as ``unknown_stream`` on the relay and ``ignored_frame_8`` on the
guest). A loopback TCP server that answers once and closes stands in for ntpsec."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest

from guest_client.relay_link import RelayLink
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import Frame, FrameType

pytestmark = pytest.mark.timeout(30)


async def _closing_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1024)
    writer.write(b"response")
    await writer.drain()
    writer.close()  # the server ends the stream, before the client does


def _close_on_data(link: RelayLink, got: list[Frame], sid: int, frame: Frame) -> None:
    got.append(frame)
    if frame.type == FrameType.STREAM_DATA:
        link.close_stream(sid)


@pytest.mark.parametrize("guest_closes_after_data", [True, False])
def test_server_closing_first_is_not_an_error_on_either_side(
        tmp_path: Path, guest_closes_after_data: bool) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_closing_first, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sock = tmp_path / "r.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           nts_ke_servers=(f"tcp:127.0.0.1:{port}",)))
        await relay.start()
        link = RelayLink(f"unix:{sock}", "ke-test", rx_clock=time.time_ns,
                         on_up=lambda ups: None, on_down=lambda r: None)
        got: list[Frame] = []
        try:
            await link.start()
            async with asyncio.timeout(5):
                while not link.connected:
                    await asyncio.sleep(0.01)
            for _ in range(3):  # several KE exchanges, as after restarts
                got.clear()
                sid = link.open_stream(got.append)
                assert sid is not None
                if guest_closes_after_data:
                    # as nts_ke_via_relay does once the response is complete: close at once,
                    # while the relay's close for the server's EOF is on its way
                    link.proto._streams[sid] = functools.partial(_close_on_data, link, got, sid)
                link.send_frame(framing.stream_open(sid, 0))
                for f in framing.stream_data(sid, b"client hello"):
                    link.send_frame(f)
                async with asyncio.timeout(5):
                    while not any(f.type == FrameType.STREAM_DATA for f in got):
                        await asyncio.sleep(0.005)
                if guest_closes_after_data:
                    await asyncio.sleep(0.2)
                else:
                    async with asyncio.timeout(5):
                        while not any(f.type == FrameType.STREAM_CLOSE for f in got):
                            await asyncio.sleep(0.005)
                    link.send_frame(framing.stream_data(sid, b"close_notify")[0])
                    link.close_stream(sid)  # a no-op for a stream the relay ended
                    await asyncio.sleep(0.1)
            assert b"response" in b"".join(f.payload for f in got
                                           if f.type == FrameType.STREAM_DATA)
            guest_errors = {k: v for k, v in link.counters.items() if "frame" in k}
            assert not guest_errors, link.counters
            assert relay.ke_proxy.counters["unknown_stream"] == 0, relay.ke_proxy.counters
            assert relay.ke_proxy.counters["opened"] == 3
        finally:
            await link.stop()
            await relay.stop()
            server.close()

    asyncio.run(main())
