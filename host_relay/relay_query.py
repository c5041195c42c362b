"""Client side of the relay's ``/status`` endpoint (its text view: ``relay_status_view``).

Blocking and dependency-free (``http.client``), for ``timesync status --relay tcp:HOST:PORT``.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from timesyncd.addresses import AddressError, parse_address
from timesyncd.relay_status_view import format_relay_status as format_relay_status  # re-export

MAX_RESPONSE = 8 << 20


class RelayQueryError(OSError):
    """No usable ``/status`` answer from the relay's metrics address."""


def metrics_host_port(address: str) -> tuple[str, int]:
    spec = address.removeprefix("http://").rstrip("/")
    kind = spec.partition(":")[0]
    if kind in ("unix", "vsock", "fc", "udp"):
        raise RelayQueryError(f"relay metrics address {address!r}: the relay serves metrics "
                              "over TCP only; give its --metrics address, tcp:HOST:PORT")
    if kind != "tcp":
        spec = "tcp:" + spec  # HOST:PORT
    try:
        addr = parse_address(spec)
    except AddressError as exc:
        raise RelayQueryError(f"relay metrics address {address!r}: {exc}") from exc
    if addr.kind != "tcp" or addr.host is None or addr.port is None:
        raise RelayQueryError(f"relay metrics address {address!r}: use tcp:HOST:PORT")
    return addr.host, addr.port


def query_relay(address: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET ``/status`` from a relay started with ``--metrics``; :class:`RelayQueryError`."""
    host, port = metrics_host_port(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/status")
        resp = conn.getresponse()
        body = resp.read(MAX_RESPONSE + 1)
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise RelayQueryError(f"relay metrics at {host}:{port}: {reason}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise RelayQueryError(f"relay metrics at {host}:{port}: HTTP {resp.status}")
    if len(body) > MAX_RESPONSE:
        raise RelayQueryError(f"relay status exceeds {MAX_RESPONSE} bytes")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RelayQueryError("relay status is not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("guests"), list):
        raise RelayQueryError("relay status has no guest list")
    return doc
