"""Kernel transmit stamps on a guest's direct ``udp:`` source (issue 18, send stamps): ``t1``
is when the request entered the device layer, not the user-space time before the send call,
so the send path (~50 us here) stops reading as outbound delay. Late stamps never leave the
socket signalling EPOLLERR (a busy loop under asyncio, a dead watcher under uvloop), and a
socket error never leaves the source deaf, under both loops."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import pytest
from loops import LOOPS, run, wait_for
from test_kernel_stamps import stamping_on

from guest_client.udp_source import UdpSource
from timesyncd.transport import kernel_stamps, open_udp


def _pending_error(sock: socket.socket) -> bool:
    """Whether the socket reports POLLERR (an error-queue entry or a pending error)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _server() -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    assert kernel_stamps.enable_rx_stamps(srv)
    return srv


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_t1_is_the_kernels_transmit_stamp_and_precedes_the_servers_receipt(
        loop_kind: str) -> None:
    probe = stamping_on()
    srv = _server()

    async def main() -> None:
        src = UdpSource(f"udp:127.0.0.1:{srv.getsockname()[1]}", clock_ns=time.monotonic_ns,
                        on_reply=lambda data, ns: None, on_error=lambda r: None)
        await src.start()
        ep = src._endpoint
        assert ep is not None and ep.tx_stamps
        try:
            for n in range(1, 6):
                before = time.monotonic_ns()
                t1 = src.send(b"request")
                returned = time.monotonic_ns()
                _, anc, _, _ = srv.recvmsg(100, kernel_stamps.CMSG_SPACE)
                arrived = kernel_stamps.stamp_from_ancillary(anc)
                assert t1 is not None and arrived is not None
                arrived_mono = arrived - kernel_stamps.realtime_offset_ns()
                assert ep.kernel_tx_stamped == n  # the kernel's, each time
                # inside the call, and never after the server had the datagram (honest t1)
                assert before < t1 <= returned
                assert t1 <= arrived_mono + 2_000, (t1 - arrived_mono) / 1e3
                assert not _pending_error(ep._sock)  # type: ignore[arg-type]
            assert ep.tx_late == 0
        finally:
            src.close()

    try:
        run(main, loop_kind)
    finally:
        srv.close()
        probe.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_stamp_left_on_the_error_queue_is_drained_and_the_source_still_hears(
        loop_kind: str) -> None:
    """A stamp the endpoint did not take (here: a datagram sent around it, as a stamp that
    arrives after the send call returns) is drained without spinning the loop, and replies
    keep coming."""
    srv = _server()
    got: list[bytes] = []

    async def main() -> None:
        ep = await open_udp(f"udp:127.0.0.1:{srv.getsockname()[1]}",
                            lambda data, ns: got.append(data))
        sock = ep._sock
        assert sock is not None and ep.tx_stamps
        try:
            sock.send(b"around")  # its stamp waits on the error queue
            srv.recvfrom(100)
            cpu = time.process_time()
            await asyncio.sleep(0.3)
            # asyncio reads on EPOLLERR and drains; uvloop may stop watching instead; neither
            # may busy-loop on it
            assert time.process_time() - cpu < 0.15
            for _ in range(3):  # the next send drains whatever is left and re-arms
                ep.send(b"request")
                _, peer = srv.recvfrom(100)
                srv.sendto(b"reply", peer)
                try:
                    await wait_for(lambda: bool(got), timeout=1.0, what="the reply")
                    break
                except AssertionError:
                    continue
            assert got == [b"reply"]
            assert ep.tx_late >= 1
            assert not _pending_error(sock)
        finally:
            ep.close()

    try:
        run(main, loop_kind)
    finally:
        srv.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_an_icmp_error_is_reported_and_the_source_hears_the_server_once_it_is_up(
        loop_kind: str) -> None:
    """Port unreachable, then a server on that port: the error is reported and the next
    exchange works (uvloop's watcher stops after an error unless re-armed)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()  # nothing listens there now
    errors: list[str] = []
    got: list[bytes] = []

    async def main() -> None:
        ep = await open_udp(f"udp:127.0.0.1:{port}", lambda data, ns: got.append(data),
                            errors.append)
        try:
            ep.send(b"request")
            await asyncio.sleep(0.1)
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            srv.bind(("127.0.0.1", port))
            srv.settimeout(0.5)
            try:
                sends = 0
                while not got and sends < 3:
                    sends += 1
                    ep.send(b"request")
                    try:
                        _, peer = srv.recvfrom(100)
                    except TimeoutError:
                        continue
                    srv.sendto(b"reply", peer)
                    with_reply = asyncio.get_running_loop().time() + 1.0
                    while not got and asyncio.get_running_loop().time() < with_reply:
                        await asyncio.sleep(0.01)
            finally:
                srv.close()
            assert got == [b"reply"], (sends, errors)
            assert sends <= 2, sends  # at most the one exchange the error spoiled
            assert "connection_refused" in errors
        finally:
            ep.close()

    run(main, loop_kind)
