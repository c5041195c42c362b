"""The only I/O layer of the core: stream listen/connect for ``vsock:``, ``unix:``, ``fc:`` and
``tcp:`` addresses as asyncio streams (or protocols), and a UDP endpoint helper. Shared by relay
and guest so both speak the same address forms with the same errors."""

from timesyncd.transport.errors import TransportError
from timesyncd.transport.stream import (
    StreamListener,
    listen_protocol,
    listen_stream,
    open_stream,
)
from timesyncd.transport.udp import UdpEndpoint, open_udp

__all__ = [
    "StreamListener",
    "TransportError",
    "UdpEndpoint",
    "listen_protocol",
    "listen_stream",
    "open_stream",
    "open_udp",
]
