"""Kernel receive stamps on UDP sockets (issue 18): on the relay's upstream socket a reply that
waits while the relay is not scheduled is stamped when it arrived, not when it was read, so the
wait is residence the guest removes instead of return-path delay that biases its offset; on a
guest's direct ``udp:`` source the same wait is no longer read as network delay at all."""

from __future__ import annotations

import socket
import time

import pytest
from loops import LOOPS, run, wait_for

from guest_client.udp_source import UdpSource
from host_relay.stats import RelayStats
from host_relay.upstream import Pending, Upstream
from timesyncd.addresses import parse_address
from timesyncd.transport import kernel_stamps

STALL_S = 0.3


def stamping_on() -> socket.socket:
    """A socket that keeps the kernel's receive stamping on, returned once it stamps.

    The kernel turns software receive stamps on for everyone when the first socket asks, but
    lazily (a static key flipped from a work queue): a datagram that arrives first is not
    stamped and the relay falls back to its read time, as it should. That race is not what
    this test is about, so it waits for stamping to be live before the exchange."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    assert kernel_stamps.enable_rx_stamps(probe)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(200):
            tx.sendto(b"x", probe.getsockname())
            _, anc, _, _ = probe.recvmsg(10, kernel_stamps.CMSG_SPACE)
            if kernel_stamps.stamp_from_ancillary(anc) is not None:
                return probe
            time.sleep(0.01)
    probe.close()
    raise AssertionError("the kernel never stamped a UDP datagram in 2 s")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_reply_waiting_while_the_relay_is_busy_is_stamped_at_arrival(loop_kind: str) -> None:
    probe = stamping_on()
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    results: list[tuple[Pending, bytes | None, int, str]] = []

    async def main() -> None:
        up = Upstream(0, parse_address(f"udp:127.0.0.1:{srv.getsockname()[1]}"), RelayStats(),
                      5.0, lambda p, r, at, why: results.append((p, r, at, why)))
        await up.open()
        try:
            assert up.stamping in ("timestamping", "timestampns")
            request = bytes([0x23]) + bytes(39) + b"cookie01"
            up.submit(request, None, 1, time.monotonic_ns())
            data, peer = srv.recvfrom(100)
            srv.sendto(bytes([0x24]) + bytes(23) + data[40:48] + bytes(16), peer)
            replied = time.monotonic_ns()
            time.sleep(STALL_S)  # the relay's loop is not scheduled meanwhile
            await wait_for(lambda: bool(results), what="the reply")
        finally:
            up.close()
        _, reply, at_ns, why = results[0]
        assert why == "" and reply is not None
        # stamped when the kernel queued it, not STALL_S later when the loop read it
        assert at_ns - replied < STALL_S * 1e9 / 3, (at_ns - replied) / 1e6

    try:
        run(main, loop_kind)
    finally:
        srv.close()
        probe.close()


def test_implausible_or_missing_stamps_fall_back_to_the_read_time() -> None:
    off = kernel_stamps.realtime_offset_ns()
    user = time.monotonic_ns()
    assert kernel_stamps.to_monotonic(None, off, user) == user
    assert kernel_stamps.to_monotonic(user + off + 10**9, off, user) == user  # in the future
    assert kernel_stamps.to_monotonic(user + off - 10**12, off, user) == user  # clock stepped
    assert kernel_stamps.to_monotonic(user + off - 1000, off, user) == user - 1000
    assert kernel_stamps.stamp_from_ancillary([]) is None
    ts = kernel_stamps._TIMESPEC.pack(5, 7) + bytes(32)
    assert kernel_stamps.stamp_from_ancillary(
        [(socket.SOL_SOCKET, kernel_stamps.SO_TIMESTAMPING, ts)]) == 5_000_000_007


def test_unix_stream_sockets_offer_no_receive_stamps() -> None:
    """Why the guest-facing legs keep user-space stamps (the module doc says so): if a kernel
    ever adds them, this fails and the relay should use them."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, kernel_stamps.SO_TIMESTAMPNS, 1)
        a.send(b"x")
        _, anc, _, _ = b.recvmsg(10, kernel_stamps.CMSG_SPACE)
        assert kernel_stamps.stamp_from_ancillary(anc) is None



@pytest.mark.parametrize("loop_kind", LOOPS)
def test_guest_udp_replies_waiting_while_the_guest_is_busy_are_stamped_at_arrival(
        loop_kind: str) -> None:
    """A direct source's t4: two replies that wait in the socket while the guest's loop is
    blocked each carry their own arrival time, not the time they were read."""
    probe = stamping_on()
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    got: list[tuple[bytes, int]] = []
    errors: list[str] = []

    async def main() -> None:
        src = UdpSource(f"udp:127.0.0.1:{srv.getsockname()[1]}", clock_ns=time.monotonic_ns,
                        on_reply=lambda data, ns: got.append((data, ns)),
                        on_error=errors.append)
        await src.start()
        try:
            assert src.send(b"request") is not None
            _, peer = srv.recvfrom(100)
            first = time.monotonic_ns()  # the kernel stamps the reply inside sendto
            srv.sendto(b"first", peer)
            time.sleep(STALL_S / 2)  # the guest's loop is not scheduled meanwhile
            second = time.monotonic_ns()
            srv.sendto(b"second", peer)
            time.sleep(STALL_S / 2)
            read_from = time.monotonic_ns()
            await wait_for(lambda: len(got) == 2, what="both replies")
            assert src._endpoint is not None and src._endpoint.kernel_stamped == 2
        finally:
            src.close()
        assert not errors
        (d1, t1), (d2, t2) = got
        assert (d1, d2) == (b"first", b"second")
        assert first <= t1 < first + STALL_S * 1e9 / 6, (t1 - first) / 1e6
        assert second <= t2 < second + STALL_S * 1e9 / 6, (t2 - second) / 1e6
        assert t2 < read_from

    try:
        run(main, loop_kind)
    finally:
        srv.close()
        probe.close()


def test_guest_udp_without_a_plausible_kernel_stamp_uses_the_read_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No stamp (a kernel or socket without them), one from the future or one an hour old
    (the realtime clock stepped): the read time; a fresh one: the stamp."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    got: list[int] = []
    stamps: list[int | None] = [None]

    async def main() -> None:
        src = UdpSource(f"udp:127.0.0.1:{srv.getsockname()[1]}", clock_ns=time.monotonic_ns,
                        on_reply=lambda data, ns: got.append(ns), on_error=lambda r: None)
        await src.start()
        ep = src._endpoint
        assert ep is not None
        try:
            assert src.send(b"request") is not None
            _, peer = srv.recvfrom(100)
            before: list[int] = []
            for offset_ns in (None, -1_000_000, 10**9, -3600 * 10**9):
                stamps[0] = None if offset_ns is None else time.time_ns() + offset_ns
                before.append(time.monotonic_ns())
                srv.sendto(b"r", peer)
                await wait_for(lambda: len(got) == len(before), what="the reply")
            assert got[0] >= before[0] and got[2] >= before[2] and got[3] >= before[3]
            assert got[1] < before[1]  # the stamp
            assert ep.kernel_stamped == 1
        finally:
            src.close()

    monkeypatch.setattr(kernel_stamps, "stamp_from_ancillary", lambda anc: stamps[0])
    try:
        run(main)
    finally:
        srv.close()
