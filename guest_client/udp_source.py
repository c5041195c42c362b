"""A plain ``udp:HOST:PORT`` NTP server used directly as a source (no relay in between).

Stamps: ``t1`` is read from the disciplined clock just before the datagram is handed to the
kernel; the receive stamp is the clock reading when the datagram is delivered to us, less the
(monotonic) time since it arrived: the kernel's receive stamp where there is one
(``timesyncd.transport.kernel_stamps``), so a reply that waited for the guest to be scheduled
does not read as return-path delay (under host CPU load that biased the offset by tens of us,
with milliseconds at the tail), else the time the transport called back.
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
        t1 = self._clock_ns()
        try:
            self._endpoint.send(data)
        except (TransportError, OSError):
            return None
        return t1

    def _datagram(self, data: bytes, rx_mono_ns: int) -> None:
        rx_ns = self._clock_ns() - (time.monotonic_ns() - rx_mono_ns)
        self._on_reply(data, rx_ns)

    def _error(self, reason: str) -> None:
        self._on_error(f"icmp_{reason}")

    @property
    def foreign(self) -> int:
        return self._endpoint.foreign if self._endpoint else 0

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
