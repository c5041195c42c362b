"""Kernel receive timestamps for UDP sockets: the relay's upstream socket and the guest's
direct ``udp:`` sources (``timesyncd.transport.udp.UdpEndpoint``).

A user-space stamp taken when the event loop gets round to reading a reply counts the time
the reply waited in the socket for the relay to be scheduled as network time, on the return
path only: measured on loopback that is ~100 us idle and milliseconds with the host's CPUs
busy, all of it an offset error in the guest. The kernel stamps the datagram when it reaches
the socket (``SO_TIMESTAMPING`` with ``SOF_TIMESTAMPING_RX_SOFTWARE``, falling back to
``SO_TIMESTAMPNS``), so the wait becomes residence the relay reports and the guest removes.

What the kernel offers (checked on Linux 6.x): UDP gives software receive stamps through either
option, and software transmit stamps on the error queue; AF_UNIX stream sockets give no
receive stamp with either option (``unix_stream_read_generic`` never calls
``__sock_recv_timestamp``; only ``unix_dgram_recvmsg`` does); AF_VSOCK stream sockets neither
(``vsock_connectible_recvmsg`` hands the transport's dequeue straight back, no timestamp
cmsg). So the guest-facing legs keep user-space stamps, taken first thing in the read
callback; what they miss stays inside the path delay the guest's bound already grants.

The stamps are CLOCK_REALTIME; the relay's residence arithmetic is CLOCK_MONOTONIC. They are
converted with the two clocks' difference read at the same moment (:func:`realtime_offset_ns`):
the difference only moves by the host clock's slew (ppm over the microseconds involved) or a
step, and a step makes a stamp implausible (in the future or older than :data:`MAX_AGE_NS`),
which falls back to the user-space stamp.

Two ways to read them. The relay reads its own socket with ``recvmsg`` and an ancillary
buffer (:func:`enable_rx_stamps`, :func:`stamp_from_ancillary`). The guest's UDP endpoint is
read by the event loop's datagram transport, which drops ancillary data, so it asks the kernel
for the stamp of the datagram just read (``SIOCGSTAMPNS``, :func:`last_stamp_ns`): the
transport calls back after each single read under both asyncio and uvloop, so "the last one
read" is the one being handled. The first such call switches stamping on for the socket.

The kernel switches software receive stamping on lazily, system-wide, when the first socket
asks for it (a static key flipped from a work queue): a reply arriving in the first moments
after the relay opens its only stamping socket may carry no stamp and gets the user-space
one, exactly as on a kernel without stamps.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import time

SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_TIMESTAMPING: int = getattr(socket, "SO_TIMESTAMPING", 37)
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
#: ancillary buffer for one timestamp cmsg (scm_timestamping is three timespecs)
CMSG_SPACE: int = socket.CMSG_SPACE(48)
_TIMESPEC = struct.Struct("qq")
#: A stamp older than this (or in the future) is not believed: the realtime clock stepped.
MAX_AGE_NS = 10_000_000_000
#: ioctl: the receive time of the last datagram read on a socket (timespec, Linux)
SIOCGSTAMPNS = 0x8907


def enable_rx_stamps(sock: socket.socket) -> str:
    """Ask for kernel receive stamps on ``sock``: ``"timestamping"``, ``"timestampns"``, or
    ``""`` when the kernel refuses both (the caller keeps user-space stamps)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING,
                        SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE)
        return "timestamping"
    except OSError:
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return "timestampns"
    except OSError:
        return ""


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC now (read back to back)."""
    return time.time_ns() - time.monotonic_ns()


def stamp_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The CLOCK_REALTIME receive stamp (ns) in ``recvmsg`` ancillary data, or None."""
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET or len(data) < _TIMESPEC.size:
            continue
        if kind == SO_TIMESTAMPING or kind == SO_TIMESTAMPNS:
            # scm_timestamping: ts[0] is the software stamp; SO_TIMESTAMPNS: one timespec
            sec, nsec = _TIMESPEC.unpack_from(data, 0)
            if sec or nsec:
                return sec * 1_000_000_000 + nsec
    return None


def to_monotonic(stamp_rt_ns: int | None, rt_offset_ns: int, user_ns: int) -> int:
    """A kernel realtime stamp as monotonic ns, or ``user_ns`` (the user-space stamp taken on
    reading) when there is none or it is implausible: never later than the read itself."""
    if stamp_rt_ns is None:
        return user_ns
    mono = stamp_rt_ns - rt_offset_ns
    if mono > user_ns or user_ns - mono > MAX_AGE_NS:
        return user_ns
    return mono


def last_stamp_ns(fd: int) -> int | None:
    """The CLOCK_REALTIME receive stamp (ns) of the last datagram read on ``fd``, or None
    (none read yet, or no stamping). The first call switches stamping on for the socket."""
    try:
        sec, nsec = _TIMESPEC.unpack(fcntl.ioctl(fd, SIOCGSTAMPNS, bytes(_TIMESPEC.size)))
    except OSError:
        return None
    return sec * 1_000_000_000 + nsec if sec > 0 else None
