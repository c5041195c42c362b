"""A small in-process fake relay on a Unix socket, for guest-side tests.

It speaks the relay framing (HELLO, NTP_REQUEST -> NTP_REPLY/ERROR) and answers from the
machine clock plus an adjustable ``shift_ns`` (to play a lying relay), so the guest's link,
forwarder and daemon can be tested without the real relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay_helpers import FakeUpstream, start_fake_upstream

from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameDecoder, FrameType
from timesyncd.server import build_server_reply


@dataclass
class FakeRelay:
    upstreams: list[str] = field(default_factory=lambda: ["local"])
    shift_ns: int = 0
    mode: str = "answer"  # "answer" | "error" | "silent" | "bad_hello" | "garbage"
    path: str = ""
    hellos: list[dict[str, object]] = field(default_factory=list)
    requests: int = 0
    _server: asyncio.base_events.Server | None = None
    _own_dir: str = ""
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        if not self.path:  # a folder of its own, removed at stop
            self._own_dir = tempfile.mkdtemp(prefix="ts-fake-relay-")
            self.path = os.path.join(self._own_dir, "relay.sock")
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def stop(self) -> None:
        await self.drop_clients()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = ""

    async def drop_clients(self) -> None:
        for w in self._writers:
            w.close()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    self._answer(frame, writer)
        except (ConnectionError, OSError, framing.FramingError):
            pass
        finally:
            writer.close()

    def _answer(self, frame: framing.Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type == FrameType.HELLO:
            self.hellos.append(framing.parse_json(frame))
            if self.mode == "bad_hello":
                writer.write(framing.json_frame(FrameType.HELLO, 0, {"version": 99}).encode())
                return
            body = {"version": framing.VERSION, "upstreams": [
                {"index": i, "name": n} for i, n in enumerate(self.upstreams)]}
            writer.write(framing.json_frame(FrameType.HELLO, 0, body).encode())
            return
        if frame.type != FrameType.NTP_REQUEST:
            return
        self.requests += 1
        index, packet = framing.parse_ntp_request(frame)
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            writer.write(b"\xff" * 16)
            return
        if self.mode == "error" or index >= len(self.upstreams):
            writer.write(framing.error(frame.request_id, ErrorCode.UPSTREAM_TIMEOUT, "no").encode())
            return
        rx = time.time_ns() + self.shift_ns
        reply = build_server_reply(packet, rx, time.time_ns() + self.shift_ns, stratum=2,
                                   reference_id=b"FAKE", reference_ns=rx - 1_000_000_000)
        writer.write(framing.ntp_reply(frame.request_id, reply, 1000, 2000).encode())


def machine_clock_reply(request: bytes, shift_ns: int = 0) -> bytes:
    """A server reply answered from the machine clock plus ``shift_ns`` (stratum 2, reference
    1 s old)."""
    now = time.time_ns() + shift_ns
    return build_server_reply(request, now, time.time_ns() + shift_ns, stratum=2,
                              reference_id=b"FAKE", reference_ns=now - 1_000_000_000)


async def start_ntp_server(shift_ns: Callable[[], int] = lambda: 0) -> FakeUpstream:
    """A loopback UDP NTP server answering from the machine clock plus ``shift_ns()`` (read
    per request: an upstream that jumps), for direct ``servers`` or a relay's upstream;
    ``received`` lists the requests it got."""
    return await start_fake_upstream(
        reply_for=lambda request: machine_clock_reply(request, shift_ns()))
