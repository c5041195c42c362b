"""Answer guests from the host clock when no upstream is configured (chrony's ``local stratum``).

The host's realtime clock is only ever read here. Residence times are still measured, so the
guest can discount the relay's own processing delay like it does for forwarded replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from timesyncd.server import build_server_reply

#: RFC 5905 reference identifier for an uncalibrated local clock.
REFERENCE_ID = b"LOCL"
NAME = "local"


class LocalSource:
    def __init__(
        self, stratum: int, *, precision: int = -20,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.stratum = stratum
        self.precision = precision
        self._clock_ns = clock_ns

    def answer(self, request: bytes) -> bytes:
        """Server reply to a client request; raises ``PacketError`` for anything else."""
        rx_ns = self._clock_ns()
        return build_server_reply(
            request, rx_ns, self._clock_ns(), stratum=self.stratum,
            reference_id=REFERENCE_ID, reference_ns=rx_ns, precision=self.precision,
        )
