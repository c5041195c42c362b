"""The guest daemon's control socket: ``timesync makestep``, an operator accepting a step.

Off by default (``control_socket``). The socket is created mode 0600, and every connection's
peer is checked with ``SO_PEERCRED`` (after its one bounded request line is read, so the
refusal reaches it): only root or the daemon's own user may use it, whatever the file's mode
became. Protocol as the status socket: one request line (``makestep``), one
JSON line back. Every use is logged with the peer's pid and uid, accepted or not. What the
step may be is the controller's decision (:meth:`GuestController.make_step`): with
authenticated sources configured, only to what they say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from timesyncd.addresses import Address
from timesyncd.transport import StreamListener, listen_stream

log = logging.getLogger(__name__)

MAX_REQUEST = 64
REQUEST_TIMEOUT_S = 2.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            _PEERCRED.size))


class ControlServer:
    """Serve ``makestep`` on a Unix socket; ``makestep()`` returns the JSON-able result."""

    def __init__(self, path: str, makestep: Callable[[], dict[str, Any]],
                 allowed_uids: frozenset[int] | None = None) -> None:
        self.path = path
        self._makestep = makestep
        self.allowed_uids = allowed_uids if allowed_uids is not None else frozenset(
            {0, os.getuid()})
        self._listener: StreamListener | None = None
        self.errors: Counter[str] = Counter()
        self.served = 0

    async def start(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        self._listener = await listen_stream(Address("unix", path=self.path), self._handle,
                                             backlog=4, limit=MAX_REQUEST, socket_mode=0o600)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(reader, writer.get_extra_info("socket"))
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            self.errors["disconnected"] += 1
        except Exception:  # a control bug must never take the daemon down
            self.errors["internal"] += 1
            log.exception("control request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, sock: Any) -> dict[str, Any]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await reader.readuntil(b"\n")  # bounded: at most MAX_REQUEST bytes
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
            line = b""
        try:
            pid, uid, _ = peer_credentials(sock)
        except (OSError, AttributeError, TypeError, struct.error):
            return self._error("no_peer_credentials", "cannot read the peer's credentials")
        if uid not in self.allowed_uids:
            log.warning("control socket: refused pid %d uid %d (allowed: %s)", pid, uid,
                        sorted(self.allowed_uids), extra={"event": "control_refused"})
            return self._error("forbidden", f"uid {uid} may not use the control socket")
        request = line.strip()
        if request != b"makestep":
            return self._error("bad_request", f"unknown request {request[:20]!r}; send "
                               "one line: makestep")
        self.served += 1
        result = self._makestep()
        log.warning("control socket: makestep by pid %d uid %d: %s", pid, uid, result,
                    extra={"event": "makestep"})
        return result

    def _error(self, reason: str, message: str) -> dict[str, Any]:
        self.errors[reason] += 1
        return {"error": f"{reason}: {message}"}


def request_makestep(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running guest daemon to step now (blocking; for the CLI). ``OSError`` if there
    is no usable answer; the answer itself may carry ``error``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"makestep\n")
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OSError(f"control answer from {path} is not JSON") from exc
    if not isinstance(obj, dict):
        raise OSError(f"control answer from {path} is not a JSON object")
    return obj
