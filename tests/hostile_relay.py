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
* ``nak``     - answer every NTS request with a forged NTS NAK (the host sees the Unique
  Identifier); ``nak_alternate`` does so for every other one and passes the rest
* ``drop_nak`` - drop the server's own NAKs (a server that rotated its keys without a NAK,
  as ntpsec does, or a host hiding them)
* ``error_text`` - replace each reply with a relay ERROR whose text carries newlines and
  terminal escapes, and inject ``junk_errors`` ERRORs for request ids never used

``impersonate_ke`` (a :class:`CertFiles`): the host answers the guest's NTS-KE streams itself
as the TLS server with that certificate (e.g. an expired one for the server's name, from the
trusted CA) and, lacking the private key's proof, cuts its flight after the Certificate
message.

Frames are modified in place of the relay's own, so request ids and residence times stay
plausible; ``counts`` says how many replies each mode touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

from OpenSSL import SSL

from timesyncd import framing
from timesyncd.framing import ErrorCode, Frame, FrameDecoder, FrameType
from timesyncd.nts.ntp import NTS_NAK_CODE
from timesyncd.packet import ExtensionField, ExtType, NtpPacket, decode
from timesyncd.transport import open_stream

MODES = ("honest", "rewrite", "rewrite_plain", "replay", "strip", "corrupt", "delay", "nak",
         "nak_alternate", "drop_nak", "error_text")
#: what ``error_text`` writes: a forged log line, a terminal escape, a bidi override
EVIL_TEXT = "boom\n2026-01-01 CRITICAL forged log line\x1b[2J\u202e" + "x" * 5000


class HostileRelay:
    def __init__(self, listen_path: Path, relay_address: str) -> None:
        self.listen_path = listen_path
        self.relay_address = relay_address
        self.mode = "honest"
        self.shift_s = 3600.0
        self.delay_s = 0.0
        #: with ``delay``: claim the hold time as inbound residence, to drag the other way
        self.lie_residence = False
        #: ``error_text``: ERROR frames for unknown ids injected per reply
        self.junk_errors = 3
        self.impersonate_ke: object | None = None  # CertFiles: (cert, key) paths
        self._requests: dict[int, NtpPacket] = {}  # request id -> the guest's request
        self._fake_streams: dict[int, SSL.Connection] = {}
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
        up = asyncio.create_task(self._pump(g_reader, r_writer, to_guest=False, back=g_writer))
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
                    to_guest: bool, back: asyncio.StreamWriter | None = None) -> None:
        decoder = FrameDecoder()
        loop = asyncio.get_running_loop()
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                if back is not None and self._from_guest(frame, back):
                    continue
                if to_guest and frame.type == FrameType.NTP_REPLY:
                    mangled = self._mangle(frame)
                    if mangled is None:
                        continue
                    if self.mode == "error_text":
                        for i in range(self.junk_errors):
                            _write(writer, framing.error(0x7FFF_0000 + i, ErrorCode.BUSY,
                                                         EVIL_TEXT))
                    if self.mode == "delay" and self.delay_s > 0:
                        loop.call_later(self.delay_s, _write, writer, mangled)
                        continue
                    frame = mangled
                _write(writer, frame)

    def _from_guest(self, frame: Frame, guest: asyncio.StreamWriter) -> bool:
        """Note requests; answer KE streams ourselves when impersonating. True: consumed."""
        if frame.type == FrameType.NTP_REQUEST:
            try:
                self._requests[frame.request_id] = decode(framing.parse_ntp_request(frame)[1])
            except Exception:  # noqa: BLE001 - not ours to judge
                pass
            while len(self._requests) > 256:
                del self._requests[next(iter(self._requests))]
            return False
        sid = frame.request_id
        if frame.type == FrameType.STREAM_OPEN and self.impersonate_ke is not None:
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            ctx.use_certificate_file(str(self.impersonate_ke.cert))  # type: ignore[attr-defined]
            ctx.use_privatekey_file(str(self.impersonate_ke.key))  # type: ignore[attr-defined]
            ctx.set_alpn_select_callback(lambda conn, protos: b"ntske/1")
            conn = SSL.Connection(ctx, None)
            conn.set_accept_state()
            self._fake_streams[sid] = conn
            self.counts["impersonated_ke"] += 1
            _write(guest, framing.stream_opened(sid))
            return True
        conn = self._fake_streams.get(sid)
        if conn is None or frame.type not in (FrameType.STREAM_DATA, FrameType.STREAM_CLOSE):
            return False
        if frame.type == FrameType.STREAM_CLOSE:
            del self._fake_streams[sid]
            return True
        conn.bio_write(frame.payload)
        with contextlib.suppress(SSL.Error):
            conn.do_handshake()
        flight = b""
        with contextlib.suppress(SSL.WantReadError):
            while True:
                flight += conn.bio_read(65536)
        for f in framing.stream_data(sid, cut_after_certificate(flight)):
            _write(guest, f)
        _write(guest, framing.stream_close(sid, "bye\r\nforged\x1b[0m"))
        del self._fake_streams[sid]
        return True

    def _mangle(self, frame: Frame) -> Frame | None:
        mode = self.mode
        payload = frame.payload
        packet = payload[8:]
        request = self._requests.pop(frame.request_id, None)
        if mode in ("nak", "nak_alternate", "drop_nak", "error_text"):
            return self._nak_modes(frame, request)
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


    def _nak_modes(self, frame: Frame, request: NtpPacket | None) -> Frame | None:
        mode = self.mode
        packet = frame.payload[8:]
        if mode == "error_text":
            self.counts[mode] += 1
            return framing.error(frame.request_id, ErrorCode.BUSY, EVIL_TEXT)
        if mode == "drop_nak":
            if len(packet) > 48 and packet[1] == 0 and packet[12:16] == NTS_NAK_CODE:
                self.counts[mode] += 1
                return None
            return frame
        uids = request.find(ExtType.UNIQUE_IDENTIFIER) if request is not None else []
        if not uids:
            return frame
        self.counts["replies_seen"] += 1
        if mode == "nak_alternate" and self.counts["replies_seen"] % 2:
            return frame
        self.counts[mode] += 1
        nak = NtpPacket(mode=4, stratum=0, reference_id=NTS_NAK_CODE,
                        origin_ts=request.transmit_ts if request else 0,
                        extensions=(ExtensionField(ExtType.UNIQUE_IDENTIFIER, uids[0].body),))
        return Frame(frame.type, frame.request_id, frame.payload[:8] + nak.encode())


def cut_after_certificate(flight: bytes) -> bytes:
    """The TLS records of a server's first flight up to its Certificate message (the 2nd
    encrypted record): what a host that has the certificate but not the key can send."""
    out, pos, encrypted = b"", 0, 0
    while pos + 5 <= len(flight) and encrypted < 2:
        end = pos + 5 + int.from_bytes(flight[pos + 3 : pos + 5], "big")
        out += flight[pos:end]
        encrypted += flight[pos] == 23
        pos = end
    return out


def _write(writer: asyncio.StreamWriter, frame: Frame) -> None:
    with contextlib.suppress(Exception):
        writer.write(frame.encode())

