"""Answer NTP client requests from a local clock (like chrony's ``local stratum``), sans-IO.

Used by the relay's host-clock mode and by the simulator's upstream; the caller reads its
clock for ``rx_ns``/``tx_ns`` and sends the bytes.
"""

from __future__ import annotations

from timesyncd.ntptime import seconds_to_short, unix_ns_to_ntp
from timesyncd.packet import Mode, NtpPacket, PacketError, decode


def build_server_reply(
    request: bytes,
    rx_ns: int,
    tx_ns: int,
    *,
    stratum: int,
    reference_id: bytes,
    reference_ns: int,
    precision: int = -20,
    root_delay_s: float = 0.0,
    root_dispersion_s: float = 0.0,
    leap: int = 0,
) -> bytes:
    """Mode 4 reply to a mode 3 ``request`` received at ``rx_ns`` and sent at ``tx_ns``.

    The request's transmit timestamp becomes our origin timestamp (the client's cookie) and its
    version and poll are echoed, as RFC 5905 section 9.2 does. Extension fields are not
    echoed: authenticated replies are built by the NTS layer. Raises :class:`PacketError`
    (``not_client_request`` or a decode reason) for anything that is not a client request,
    so a server never answers replies or broadcasts and cannot be made to loop.
    """
    if not 0 <= stratum <= 255:
        raise ValueError(f"stratum {stratum} out of range 0..255")
    if len(reference_id) != 4:
        raise ValueError("reference_id must be 4 bytes")
    req = decode(request)
    if req.mode != Mode.CLIENT:
        raise PacketError("not_client_request", f"mode {req.mode}")
    reply = NtpPacket(
        leap=leap, version=req.version, mode=Mode.SERVER, stratum=stratum, poll=req.poll,
        precision=precision, root_delay=seconds_to_short(root_delay_s),
        root_dispersion=seconds_to_short(root_dispersion_s), reference_id=reference_id,
        reference_ts=unix_ns_to_ntp(reference_ns), origin_ts=req.transmit_ts,
        receive_ts=unix_ns_to_ntp(rx_ns), transmit_ts=unix_ns_to_ntp(tx_ns),
    )
    return reply.encode()
