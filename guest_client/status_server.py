"""The guest daemon's local status socket, and the client the CLI uses to read it.

Protocol (AF_UNIX stream): the client sends one line, ``status``; the server answers one line
of JSON and closes. Anything else gets ``{"error": ...}``, is counted, and never hurts the
daemon: requests are size- and time-bounded. The request line must arrive within
:data:`REQUEST_TIMEOUT_S`, and when every slot is taken a client is evicted, slow ones first
(see ``timesyncd.transport.slots``), so slow clients cannot make the daemon answer "busy".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from guest_client.settings import DEFAULT_STATUS_SOCKET
from timesyncd.addresses import Address
from timesyncd.transport import StreamListener, listen_stream
from timesyncd.transport.slots import ClientSlots, read_until

__all__ = ["DEFAULT_STATUS_SOCKET", "StatusError", "StatusServer", "query_status"]

log = logging.getLogger(__name__)

MAX_REQUEST = 256
#: Clients held at once; beyond it one is evicted. Above the size of attack the issue names
#: (100 slow connections), so such an attack evicts nobody: its connections only time out.
MAX_CLIENTS = 128
MAX_RESPONSE = 1 << 20
#: The request line must arrive within this (``query_status`` sends it at once).
REQUEST_TIMEOUT_S = 1.0
#: Writing the answer may take this long.
REPLY_TIMEOUT_S = 2.0


class StatusError(OSError):
    """The status socket answered, but not with a status object."""


class StatusServer:
    """Serve ``provider()`` (a JSON-able dict) on a Unix socket."""

    def __init__(
        self, path: str, provider: Callable[[], dict[str, Any]], mode: int = 0o660,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = path
        self.mode = mode
        self._provider = provider
        self._listener: StreamListener | None = None
        self._slots = ClientSlots(max_clients)
        self.errors: Counter[str] = Counter()
        self.served = 0

    async def start(self) -> None:
        # the transport refuses a missing folder (one rule for every socket file), replaces
        # a stale socket, refuses a live one or a regular file, and
        # on close unlinks the socket only if it is still ours
        self._listener = await listen_stream(
            Address("unix", path=self.path), self._handle, backlog=MAX_CLIENTS * 2,
            limit=MAX_REQUEST, socket_mode=self.mode,
        )

    async def stop(self) -> None:
        """Stop listening and end every open connection (their clients see EOF)."""
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._slots.admit(writer, writer.transport)
        try:
            reply = await self._answer(reader, writer)
            if self._slots.evicted(writer):
                self.errors["evicted"] += 1
                return
            await asyncio.wait_for(self._reply(writer, reply), REPLY_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError):
            self.errors["evicted" if self._slots.evicted(writer) else "disconnected"] += 1
        except Exception:  # a status bug must never take the daemon down
            self.errors["internal"] += 1
            log.exception("status request failed")
        finally:
            self._slots.release(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, key: object = None) -> dict[str, Any]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await read_until(reader, b"\n", MAX_REQUEST, self._slots, key)
        except asyncio.LimitOverrunError:
            return self._error("oversized", f"request longer than {MAX_REQUEST} bytes")
        except asyncio.IncompleteReadError as exc:
            if self._slots.evicted(key):
                return {}  # not a request: the caller counts the eviction
            if len(exc.partial) > MAX_REQUEST:
                return self._error("oversized", f"request longer than {MAX_REQUEST} bytes")
            line = exc.partial  # EOF without newline: accept the request as is
        except TimeoutError:
            return self._error("timeout", "no request line received")
        if len(line) > MAX_REQUEST:
            return self._error("oversized", f"request longer than {MAX_REQUEST} bytes")
        request = line.strip()
        if request != b"status":
            return self._error("bad_request", f"unknown request {request[:40]!r}; send 'status'")
        self.served += 1
        return self._provider()

    def _error(self, reason: str, message: str) -> dict[str, Any]:
        self.errors[reason] += 1
        return {"error": f"{reason}: {message}"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
        await writer.drain()



def query_status(path: str = DEFAULT_STATUS_SOCKET, timeout: float = 2.0) -> dict[str, Any]:
    """Ask a running guest daemon for its status (blocking; for the CLI).

    Raises ``OSError`` (``StatusError`` for a bad or error answer) if there is no usable answer.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:  # the listen backlog is full for a moment: try again
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        sock.sendall(b"status\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise StatusError(f"status answer from {path} exceeds {MAX_RESPONSE} bytes")
    try:
        obj = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatusError(f"status answer from {path} is not JSON") from exc
    if not isinstance(obj, dict):
        raise StatusError(f"status answer from {path} is not a JSON object")
    if "error" in obj:
        raise StatusError(f"status socket {path} refused: {obj['error']}")
    return obj
