"""A test-only hostile host: a frame-level man in the middle between a guest and the relay.

It sees and controls everything the host controls: every frame both ways. Byte streams
(NTS-KE) pass untouched (it cannot open TLS); NTP replies are mangled as ``mode`` says:

* ``honest``  - forward unchanged
* ``rewrite`` - add ``shift_s`` to the server's receive and transmit timestamps
* ``rewrite_plain`` - the same, but only for plain (48-byte, unauthenticated) replies
* ``replay``  - answer with an old reply recorded earlier (same source, new request id)
* ``strip``   - cut every extension field (NTS fields gone; the NTP header alone stays)
* ``corrupt`` - flip one bit in the last byte (the NTS authenticator's ciphertext)
* ``delay``   - hold replies back ``delay_s`` seconds (one direction only), optionally
  lying about the relay's residence times (``lie_residence``)

Frames are modified in place of the relay's own, so request ids and residence times stay
plausible; ``counts`` says how many replies each mode touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

from timesyncd.framing import Frame, FrameDecoder, FrameType
from timesyncd.transport import open_stream

MODES = ("honest", "rewrite", "rewrite_plain", "replay", "strip", "corrupt", "delay")


class HostileRelay:
    def __init__(self, listen_path: Path, relay_address: str) -> None:
        self.listen_path = listen_path
        self.relay_address = relay_address
        self.mode = "honest"
        self.shift_s = 3600.0
        self.delay_s = 0.0
        #: with ``delay``: claim the hold time as inbound residence, to drag the other way
        self.lie_residence = False
        self.counts: Counter[str] = Counter()
        self._recorded: list[bytes] = []  # honest reply payloads (residence + packet)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"unix:{self.listen_path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.listen_path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, g_reader: asyncio.StreamReader, g_writer: asyncio.StreamWriter) -> None:
        r_reader, r_writer = await open_stream(self.relay_address, timeout_s=2.0)
        self._writers |= {g_writer, r_writer}
        up = asyncio.create_task(self._pump(g_reader, r_writer, to_guest=False))
        down = asyncio.create_task(self._pump(r_reader, g_writer, to_guest=True))
        self._tasks |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            g_writer.close()
            r_writer.close()
            self._tasks -= {up, down}
            self._writers -= {g_writer, r_writer}

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    to_guest: bool) -> None:
        decoder = FrameDecoder()
        loop = asyncio.get_running_loop()
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                if to_guest and frame.type == FrameType.NTP_REPLY:
                    frame = self._mangle(frame)
                    if self.mode == "delay" and self.delay_s > 0:
                        loop.call_later(self.delay_s, _write, writer, frame)
                        continue
                _write(writer, frame)

    def _mangle(self, frame: Frame) -> Frame:
        mode = self.mode
        payload = frame.payload
        packet = payload[8:]
        if mode == "honest":
            if len(self._recorded) < 64:
                self._recorded.append(payload)
            return frame
        self.counts[mode] += 1
        if mode == "rewrite_plain" and len(packet) != 48:
            return frame
        if mode in ("rewrite", "rewrite_plain"):
            delta = round(self.shift_s * 2**32)
            rx = (int.from_bytes(packet[32:40], "big") + delta) % 2**64
            tx = (int.from_bytes(packet[40:48], "big") + delta) % 2**64
            packet = packet[:32] + rx.to_bytes(8, "big") + tx.to_bytes(8, "big") + packet[48:]
        elif mode == "replay" and self._recorded:
            return Frame(frame.type, frame.request_id, self._recorded[len(self._recorded) // 2])
        elif mode == "strip":
            packet = packet[:48]
        elif mode == "corrupt":
            packet = packet[:-1] + bytes([packet[-1] ^ 0x01])
        elif mode == "delay" and self.lie_residence:
            payload = round(self.delay_s * 1e9).to_bytes(4, "big") + bytes(4) + payload[8:]
        return Frame(frame.type, frame.request_id, payload[:8] + packet)


def _write(writer: asyncio.StreamWriter, frame: Frame) -> None:
    with contextlib.suppress(Exception):
        writer.write(frame.encode())

