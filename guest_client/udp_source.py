"""A plain ``udp:HOST:PORT`` NTP server used directly as a source (no relay in between).

Stamps: the endpoint says when (monotonic) a request left and a reply arrived, from the kernel
where it can (``timesyncd.transport.udp``): the transmit stamp, so the send path is not read as
outbound delay, and the receive stamp, so a reply that waited for the guest to be scheduled is
not read as return-path delay (under host CPU load that biased the offset by tens of us, with
milliseconds at the tail). Each is carried to the disciplined clock as its reading now less
the monotonic time since; the two reads are ordered so that a preemption between them moves
``t1`` earlier and ``t4`` later, never the other way (the offset's interval stays honest).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from timesyncd.addresses import parse_address
from timesyncd.transport import TransportError, UdpEndpoint, open_udp


class UdpSource:
    def __init__(
        self, address: str, *, clock_ns: Callable[[], int],
        on_reply: Callable[[bytes, int], None], on_error: Callable[[str], None],
    ) -> None:
        self.address = parse_address(address)
        if self.address.kind != "udp":
            raise ValueError(f"{address!r} is not a udp:HOST:PORT address")
        self.name = str(self.address)
        self._clock_ns = clock_ns
        self._on_reply = on_reply
        self._on_error = on_error
        self._endpoint: UdpEndpoint | None = None

    async def start(self) -> None:
        self._endpoint = await open_udp(self.address, self._datagram, self._error)

    def send(self, data: bytes) -> int | None:
        """Send one request; return its ``t1`` on the disciplined clock, None if closed."""
        if self._endpoint is None or self._endpoint.closed:
            return None
        try:
            sent_mono = self._endpoint.send(data)
        except (TransportError, OSError):
            return None
        reading = self._clock_ns()  # first: a preemption before the next read makes t1 earlier
        return reading - (time.monotonic_ns() - sent_mono)

    def _datagram(self, data: bytes, rx_mono_ns: int) -> None:
        since = time.monotonic_ns() - rx_mono_ns  # first: a preemption makes t4 later
        self._on_reply(data, self._clock_ns() - since)

    def _error(self, reason: str) -> None:
        self._on_error(f"icmp_{reason}")

    @property
    def foreign(self) -> int:
        return self._endpoint.foreign if self._endpoint else 0

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
