"""Kernel timestamps for UDP sockets: receive stamps on the relay's upstream socket and on the
guest's direct ``udp:`` sources (``timesyncd.transport.udp.UdpEndpoint``), transmit stamps on
the latter.

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

Both users read their socket with ``recvmsg`` and an ancillary buffer (:func:`enable_rx_stamps`,
:func:`stamp_from_ancillary`): the loop's datagram transport drops ancillary data. The guest's
endpoint also takes transmit stamps (:func:`enable_tx_stamps`, :func:`drain_tx_stamps`,
:func:`tx_to_monotonic`): UDP offers them on the error queue. The relay's upstream does not:
its user-space stamp is taken right before ``send()``, so the kernel's send path (~17 us of
round trip here, ~8 us of offset: ``bench/send_stamps.py``) is unmeasured time inside the
request leg, within the path delay the guest's bound grants; the kernel's stamp would cost one
more ``recvmsg`` per exchange on the forwarding hot path.

The kernel switches software receive stamping on lazily, system-wide, when the first socket
asks for it (a static key flipped from a work queue): a reply arriving in the first moments
after the relay opens its only stamping socket may carry no stamp and gets the user-space
one, exactly as on a kernel without stamps.
"""

from __future__ import annotations

import socket
import struct
import time

from timesyncd.clock_pair import TIGHT_NS, read_pair

SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_TIMESTAMPING: int = getattr(socket, "SO_TIMESTAMPING", 37)
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
#: transmit stamp taken as the packet enters the device layer, inside the send call
SOF_TIMESTAMPING_TX_SCHED = 1 << 8
#: error-queue entries carry the stamp only, not a copy of the packet
SOF_TIMESTAMPING_OPT_TSONLY = 1 << 11
#: ancillary room for an error-queue entry: the stamp and the extended error with its address
ERRQUEUE_CMSG_SPACE = 256
#: error-queue entries read per call at most (a backlog of late stamps never holds the caller)
MAX_ERRQUEUE_READS = 16
#: ancillary buffer for one timestamp cmsg (scm_timestamping is three timespecs)
CMSG_SPACE: int = socket.CMSG_SPACE(48)
_TIMESPEC = struct.Struct("qq")
#: A stamp older than this (or in the future) is not believed: the realtime clock stepped.
MAX_AGE_NS = 10_000_000_000


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


def enable_tx_stamps(sock: socket.socket) -> bool:
    """Ask for kernel receive stamps and transmit stamps (``TX_SCHED``, on the error queue) on
    ``sock``; False when the kernel refuses (the caller then asks for receive stamps only).

    With these flags ``SIOCGSTAMPNS`` stops answering (ENOENT, Linux 6.18): the socket must
    be read with ``recvmsg`` and its ancillary data, and its error queue drained, since a
    stamp left there makes the socket report EPOLLERR, which would spin an event loop."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING,
                        SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE
                        | SOF_TIMESTAMPING_TX_SCHED | SOF_TIMESTAMPING_OPT_TSONLY)
    except OSError:
        return False
    return True


def drain_tx_stamps(sock: socket.socket) -> tuple[int | None, int]:
    """Read ``sock``'s error queue: (the newest transmit stamp in it, CLOCK_REALTIME ns, or
    None; how many entries were read). ``sock`` must be non-blocking: on a socket with a
    timeout Python retries an empty read while the socket polls readable, for the whole
    timeout."""
    newest: int | None = None
    read = 0
    for _ in range(MAX_ERRQUEUE_READS):
        try:
            _, anc, _, _ = sock.recvmsg(1, ERRQUEUE_CMSG_SPACE,
                                        socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:  # empty (EAGAIN), or nothing an error queue read can report
            break
        read += 1
        stamp = stamp_from_ancillary(anc)
        if stamp is not None:
            newest = stamp
    return newest, read


def tx_to_monotonic(stamp_rt_ns: int | None, sent_ns: int, returned_ns: int) -> int | None:
    """A transmit stamp as monotonic ns, moved earlier by the conversion's possible error, or
    None unless it lies inside the send call (``sent_ns`` just before it, ``returned_ns``
    after): a departure time must never be later than the departure, or the offset's interval
    would not contain the truth. A stamp left from an earlier send lies before ``sent_ns``."""
    if stamp_rt_ns is None:
        return None
    pair = read_pair(time.monotonic_ns, time.time_ns)
    if pair.spread_ns > TIGHT_NS:
        return None
    mono = stamp_rt_ns - pair.difference_ns - (pair.spread_ns + 1) // 2
    return mono if sent_ns <= mono <= returned_ns else None


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
