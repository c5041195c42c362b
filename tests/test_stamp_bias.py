"""Timestamping bias of the guest daemon: where t1/t4 are taken, and what that costs.

``stamp_probe`` runs the real daemon (real relay link, real in-process relay on a Unix socket
answering from the host clock) with a probe controller and a rate-exact software clock, so a
sample's measured offset minus the clock's true offset is pure measurement bias.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import pytest
from stamp_probe import probe, run

from guest_client.relay_link import RelayLink, RelayReply
from timesyncd import framing
from timesyncd.framing import FrameType
from timesyncd.packet import NtpPacket

pytestmark = pytest.mark.timeout(90)

#: Bound on the mean bias of the better half of the samples (by delay), microseconds.
#: Stamping t1 before the framing and write (the old code) measured -42..-55 us here on both
#: loops; the current stamps measure -8..+5 us. 25 us sits in the middle: a shared 2-core
#: machine's scheduling noise moves the low-delay mean by a few us, not by 17. The low-delay
#: half is used because a descheduled process adds one-sided delays of milliseconds (which
#: the discipline weights to nothing anyway) that would dominate a plain mean.
MAX_BIAS_US = 25.0
SAMPLES = 300


def _low_delay_mean(bias: list[float], delay: list[float]) -> float:
    pairs = sorted(zip(delay, bias, strict=True))
    return statistics.fmean(b for _, b in pairs[: len(pairs) // 2])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_relay_measurement_bias_is_small(loop: str) -> None:
    res = run(lambda: probe("relay", SAMPLES, interval_s=0.01), loop)
    assert len(res.bias_us) == SAMPLES and res.rejected == 0
    bias = _low_delay_mean(res.bias_us, res.delay_us)
    print(f"{loop}: low-delay mean bias {bias:+.1f} us, median "
          f"{statistics.median(res.bias_us):+.1f} us, median delay "
          f"{statistics.median(res.delay_us):.0f} us")
    assert abs(bias) < MAX_BIAS_US, res.summary()


class _Transport:
    """Enough of a transport for the link: records writes and the protocol it is given."""

    def __init__(self, now: list[int] | None = None, write_cost: int = 0) -> None:
        self.written: list[bytes] = []
        self.protocol: Any = None
        self._now = now
        self._write_cost = write_cost

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0  # every write goes straight out

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self._now is not None:
            self._now[0] += self._write_cost  # the syscall takes time

    def close(self) -> None:
        pass

    abort = close


class _Writer:
    def __init__(self, transport: _Transport) -> None:
        self.transport = transport

    def close(self) -> None:
        pass


async def _connected(now: list[int], write_cost: int = 0) -> tuple[RelayLink, _Transport]:
    transport = _Transport(now, write_cost)

    async def connect(_: str) -> tuple[Any, Any]:
        return None, _Writer(transport)

    link = RelayLink("unix:/nonexistent", "g", rx_clock=lambda: now[0], on_up=lambda u: None,
                     on_down=lambda r: None, connect=connect)
    await link.start()
    for _ in range(5):
        await asyncio.sleep(0)
    hello = {"version": framing.VERSION, "upstreams": [{"index": 0, "name": "local"}]}
    transport.protocol.data_received(framing.json_frame(FrameType.HELLO, 0, hello).encode())
    for _ in range(5):
        await asyncio.sleep(0)
    assert link.connected
    return link, transport


def test_reply_is_stamped_when_the_bytes_arrive_not_when_the_reader_wakes() -> None:
    """t4 comes from the transport's ``data_received``, chunk by chunk: a frame gets the stamp
    of the chunk that completed it, however late the link's task runs."""
    now = [0]
    results: list[Any] = []

    async def main() -> None:
        link, transport = await _connected(now)
        try:
            req = NtpPacket(transmit_ts=1).encode()
            ids = [link.send(0, req, results.append) for _ in range(3)]
            frames = [framing.ntp_reply(rid, req, 0, 0).encode() for rid in ids if rid]
            now[0] = 1000
            transport.protocol.data_received(frames[0] + frames[1][:10])  # one whole, one part
            now[0] = 2000
            transport.protocol.data_received(frames[1][10:])  # completes the second
            now[0] = 3000
            transport.protocol.data_received(frames[2])
            now[0] = 9999  # the link's task only runs now
            for _ in range(5):
                await asyncio.sleep(0)
        finally:
            await link.stop()

    asyncio.run(main())
    assert [r.rx_ns for r in results if isinstance(r, RelayReply)] == [1000, 2000, 3000]


def test_t1_is_never_later_than_the_bytes_left() -> None:
    """Issue 12: t1 stamped after the write returned could be later than the relay's receipt
    (a slow first write), so the first exchange's delay came out negative (``bad_delay=1`` on
    every clean start). The link's t1 is taken after framing, just before the write."""
    now = [0]

    async def main() -> None:
        link, transport = await _connected(now, write_cost=500)
        try:
            now[0] = 10_000
            rid = link.send(0, NtpPacket(transmit_ts=1).encode(), lambda r: None)
            assert rid is not None and now[0] == 10_500  # the write took 500 ns
            assert link.last_tx_ns == 10_000
        finally:
            await link.stop()

    asyncio.run(main())
