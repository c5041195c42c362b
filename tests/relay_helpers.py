"""A minimal guest side of the relay protocol for tests (the real one is guest_client's)."""

from __future__ import annotations

import asyncio
from typing import Any

from support.packets import client_packet as client_packet  # re-exported for the relay tests

from timesyncd import framing
from timesyncd.framing import Frame, FrameDecoder
from timesyncd.transport import open_stream


class Guest:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    @classmethod
    async def connect(cls, address: str, hello: bool = True, name: str = "t") -> Guest:
        reader, writer = await open_stream(address, timeout_s=2)
        guest = cls(reader, writer)
        if hello:
            guest.send(framing.guest_hello(name))
            guest.hello = framing.parse_json(await guest.recv())
        return guest

    hello: Any = None

    def send(self, frame: Frame) -> None:
        self.writer.write(frame.encode())

    def request(self, rid: int, upstream: int, packet: bytes) -> None:
        self.send(framing.ntp_request(rid, upstream, packet))

    async def recv(self, timeout: float = 3.0) -> Frame:
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("relay closed the connection")
                self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True once the relay closes the stream (frames before that are kept)."""
        try:
            async with asyncio.timeout(timeout):
                while data := await self.reader.read(65536):
                    self.frames.extend(self.decoder.feed(data))
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class FakeUpstream(asyncio.DatagramProtocol):
    """A UDP 'NTP server' on loopback that records requests and answers as told.

    ``reply_for(request) -> bytes | None`` builds the reply (None: stay silent);
    ``delay_s`` holds replies back.
    """

    def __init__(self, reply_for: Any = None, delay_s: float = 0.0) -> None:
        self.reply_for = reply_for or echo_reply
        self.delay_s = delay_s
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        reply = self.reply_for(data)
        if reply is None or self.transport is None:
            return
        if self.delay_s:
            asyncio.get_running_loop().call_later(self.delay_s, self._send, reply, addr)
        else:
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(reply, addr)

    @property
    def address(self) -> str:
        return f"udp:127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def echo_reply(request: bytes) -> bytes:
    """A mode-4 'reply' carrying the request's transmit timestamp as origin, plus the
    request's tail (extension fields) so pass-through is visible."""
    head = bytes([0x24, 2]) + request[2:24] + request[40:48] + request[40:48] * 2
    return head + request[48:]


async def start_fake_upstream(**kwargs: Any) -> FakeUpstream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: FakeUpstream(**kwargs), local_addr=("127.0.0.1", 0)
    )
    return proto
