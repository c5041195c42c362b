"""A tiny HTTP/1.1 server on the relay's event loop: ``GET /metrics`` and ``GET /status``.

``/metrics`` is the Prometheus text format; ``/status`` is JSON (relay counters, upstreams and
every connected guest with its last health report) for ``timesync status --relay``. Serving on
the loop that owns the data means a scrape sees one consistent moment and needs no locks.
Requests are size-, time- and concurrency-bounded; one request per connection. A client must
send its whole request head within :data:`HEAD_TIMEOUT_S`, and when every slot is taken a
client is evicted, slow ones first (see ``timesyncd.transport.slots``), so slow clients
(slowloris) cannot lock Prometheus out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from timesyncd.transport import StreamListener, listen_stream
from timesyncd.transport.slots import ClientSlots, read_until

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
#: The whole request head must arrive within this (a scraper sends it at once).
HEAD_TIMEOUT_S = 1.0
#: Writing the answer may take this long (a large /status to a slow reader).
REQUEST_TIMEOUT_S = 5.0
#: Clients held at once; beyond it one is evicted (counted in the relay's descriptor budget
#: while held). Above the size of attack the issue names (100 slow connections), so such an
#: attack evicts nobody: its connections only time out.
MAX_CLIENTS = 128


class MetricsServer:
    """Serve ``metrics()`` (bytes) and ``status()`` (a JSON-able dict) at ``address``."""

    def __init__(self, address: str, metrics: Callable[[], bytes],
                 status: Callable[[], dict[str, Any]]) -> None:
        self.address = address
        self._metrics = metrics
        self._status = status
        self._listener: StreamListener | None = None
        self._slots = ClientSlots(MAX_CLIENTS)
        self.requests: Counter[str] = Counter()

    async def start(self) -> None:
        self._listener = await listen_stream(self.address, self._handle, backlog=64,
                                             limit=MAX_REQUEST_HEAD)
        log.info("metrics at http://%s/metrics, status at /status", self.bound,
                 extra={"event": "metrics_listening", "address": self.bound})

    async def stop(self) -> None:
        """Stop listening and end requests in progress (the listener does both)."""
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    @property
    def clients(self) -> int:
        """Connections held now (each one a descriptor)."""
        return len(self._slots)

    @property
    def bound(self) -> str:
        """``HOST:PORT`` actually bound (port 0 resolved)."""
        assert self._listener is not None
        b = self._listener.bound
        host = f"[{b.host}]" if b.host and ":" in b.host else b.host
        return f"{host}:{b.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._slots.admit(writer, writer.transport)
        try:
            status, ctype, body = await self._answer(reader, writer)
            if self._slots.evicted(writer):  # aborted mid-request by a newer client
                self.requests["evicted"] += 1
                return
            if not status:  # the client closed before a complete head
                self.requests["bad_request"] += 1
                status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    "Cache-Control: no-store\r\n\r\n")
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError):
            self.requests["evicted" if self._slots.evicted(writer) else "disconnected"] += 1
        except Exception:  # a rendering bug must never take the relay down
            self.requests["internal"] += 1
            log.exception("metrics request failed", extra={"event": "metrics_error"})
        finally:
            self._slots.release(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader,
                      key: object) -> tuple[str, str, bytes]:
        try:
            head = await asyncio.wait_for(
                read_until(reader, b"\r\n\r\n", MAX_REQUEST_HEAD, self._slots, key),
                HEAD_TIMEOUT_S)
        except TimeoutError:
            self.requests["head_timeout"] += 1
            return "408 Request Timeout", "text/plain", b"request head too slow\n"
        except asyncio.IncompleteReadError:  # closed early, or evicted: the caller tells
            return "", "", b""
        except (asyncio.LimitOverrunError, ValueError):
            self.requests["bad_request"] += 1
            return "400 Bad Request", "text/plain", b"bad request\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self.requests["bad_request"] += 1
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            self.requests["bad_method"] += 1
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if target == b"/metrics":
            self.requests["metrics"] += 1
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics()
        if target == b"/status":
            self.requests["status"] += 1
            body = json.dumps(self._status(), separators=(",", ":"), default=str).encode()
            return "200 OK", "application/json", body + b"\n"
        self.requests["not_found"] += 1
        return "404 Not Found", "text/plain", b"try /metrics or /status\n"
