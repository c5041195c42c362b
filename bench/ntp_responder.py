"""A fast loopback NTP server for benchmarks: one blocking UDP socket in a tight loop.

A loopback chronyd answers about 15,000 exchanges/s, which would make it the bottleneck of
every forwarding benchmark; this answers far more. Replies are valid RFC 5905 server replies
(stratum 1, origin = request transmit, receive/transmit from the host clock, read only), so a
real guest daemon accepts them. Bounded: exits after ``--max-seconds``.

Usage: ``python bench/ntp_responder.py [--port 0] [--max-seconds 600]``; prints the bound port
on its first line of stdout, then serves.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time

_NTP_EPOCH_OFFSET = 2_208_988_800
_HEADER = struct.Struct("!BBbbII4s")  # li/vn/mode, stratum, poll, precision, rdelay, rdisp, refid
_TS3 = struct.Struct("!QQQ")  # origin, receive, transmit (reference written separately)
_TS = struct.Struct("!Q")


def ntp_timestamp(unix_ns: int) -> int:
    """Unix ns as a 64-bit NTP timestamp (era 0)."""
    sec, ns = divmod(unix_ns, 1_000_000_000)
    return ((sec + _NTP_EPOCH_OFFSET) << 32) | ((ns << 32) // 1_000_000_000)


def serve(sock: socket.socket, deadline: float) -> int:
    """Answer mode-3 requests until ``deadline`` (monotonic seconds); return replies sent."""
    buf = bytearray(2048)
    out = bytearray(48)
    time_ns = time.time_ns
    recvfrom_into = sock.recvfrom_into
    sendto = sock.sendto
    pack_header = _HEADER.pack_into
    pack_ts3 = _TS3.pack_into
    pack_ts = _TS.pack_into
    replies = 0
    sock.settimeout(0.5)  # wake up now and then to honour the deadline
    reference = ntp_timestamp(time_ns())
    while True:
        try:
            n, addr = recvfrom_into(buf)
        except TimeoutError:
            if time.monotonic() >= deadline:
                return replies
            reference = ntp_timestamp(time_ns())
            continue
        rx = time_ns()
        if n < 48 or buf[0] & 7 != 3:
            continue
        # root delay 0, root dispersion ~15 us (16.16 s), reference id "BNCH"
        pack_header(out, 0, (buf[0] & 0x38) | 4, 1, buf[2], -20, 0, 1, b"BNCH")
        pack_ts(out, 16, reference)
        pack_ts3(out, 24, int.from_bytes(buf[40:48], "big"), ntp_timestamp(rx),
                 ntp_timestamp(time_ns()))
        sendto(out, addr)
        replies += 1
        if replies & 0xFFFF == 0:
            if time.monotonic() >= deadline:
                return replies
            reference = ntp_timestamp(rx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", args.port))
    print(sock.getsockname()[1], flush=True)
    try:
        serve(sock, time.monotonic() + args.max_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
