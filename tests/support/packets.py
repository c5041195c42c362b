"""NTP packets tests send."""

from __future__ import annotations

import os
import struct


def client_packet(transmit_ts: int | None = None, extra: bytes = b"") -> bytes:
    """NTPv4 client request (mode 3, poll 6, precision -20) with a random transmit timestamp
    unless given, followed by ``extra`` (extension fields)."""
    xmt = transmit_ts if transmit_ts is not None else int.from_bytes(os.urandom(8), "big")
    return struct.pack("!BBbbII4sQQQQ", 0x23, 0, 6, -20, 0, 0, b"\0" * 4, 0, 0, 0,
                       xmt) + extra
