"""Stream and UDP transports over AF_UNIX and loopback (vsock sockets are never opened here)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import pytest
from loops import LOOPS, run

from timesyncd.addresses import parse_address
from timesyncd.transport import TransportError, listen_stream, open_stream, open_udp


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _roundtrip(spec: str, payload: bytes = b"ping") -> bytes:
    reader, writer = await open_stream(spec, timeout_s=2)
    writer.write(payload)
    data = await reader.readexactly(len(payload))
    writer.close()
    return data


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_unix_listen_connect_and_cleanup(tmp_path, loop_kind):
    path = tmp_path / "relay.sock"

    async def main() -> None:
        listener = await listen_stream(f"unix:{path}", _echo, socket_mode=0o660)
        try:
            assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o660
            assert await _roundtrip(f"unix:{path}") == b"ping"
        finally:
            await listener.close()
        assert not path.exists()

    run(main, loop_kind)


def test_tcp_port_zero_reports_bound_port():
    async def main() -> None:
        listener = await listen_stream("tcp:127.0.0.1:0", _echo)
        try:
            assert listener.bound.port != 0
            assert await _roundtrip(str(listener.bound)) == b"ping"
        finally:
            await listener.close()

    run(main)


def test_stale_socket_replaced_but_live_socket_and_regular_file_refused(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # file stays, nobody listens: stale
    regular = tmp_path / "file.sock"
    regular.write_text("precious")

    async def main() -> None:
        listener = await listen_stream(f"unix:{stale}", _echo)
        try:
            assert await _roundtrip(f"unix:{stale}") == b"ping"
            with pytest.raises(TransportError) as live:
                await listen_stream(f"unix:{stale}", _echo)
            assert live.value.reason == "address_in_use"
            with pytest.raises(TransportError) as notsock:
                await listen_stream(f"unix:{regular}", _echo)
            assert notsock.value.reason == "path_not_socket"
        finally:
            await listener.close()

    run(main)
    assert regular.read_text() == "precious"


def test_close_does_not_unlink_a_successors_socket(tmp_path):
    path = tmp_path / "r.sock"

    async def main() -> None:
        first = await listen_stream(f"unix:{path}", _echo)
        try:
            os.unlink(path)  # e.g. an operator removed it and a new relay started
            second = await listen_stream(f"unix:{path}", _echo)
            try:
                await first.close()
                assert path.is_socket()
                assert await _roundtrip(f"unix:{path}") == b"ping"
            finally:
                await second.close()
        finally:
            await first.close()  # a no-op once the test closed it
        assert not path.exists()

    run(main)


def test_fc_listen_path_is_uds_path_underscore_port(tmp_path):
    uds = tmp_path / "v.sock"

    async def main() -> None:
        listener = await listen_stream(f"fc:{uds}:5005", _echo)
        try:
            assert (tmp_path / "v.sock_5005").is_socket()
            assert not uds.exists()
            # Firecracker itself connects to UDS_PORT directly for guest-initiated connections
            assert await _roundtrip(f"unix:{tmp_path / 'v.sock_5005'}") == b"ping"
        finally:
            await listener.close()
        assert not (tmp_path / "v.sock_5005").exists()

    run(main)


async def _fake_muxer(path: str, answer: Callable[[int], bytes | None], seen: list[bytes]):
    """A stand-in for Firecracker's host-side vsock muxer on AF_UNIX."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        seen.append(line)
        port = int(line.split()[1])
        reply = answer(port)
        if reply is None:
            writer.close()
            return
        writer.write(reply)
        await _echo(reader, writer)

    return await asyncio.start_unix_server(handle, path=path)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_fc_connect_speaks_connect_handshake(tmp_path, loop_kind):
    uds = str(tmp_path / "v.sock")
    seen: list[bytes] = []

    async def main() -> None:
        server = await _fake_muxer(uds, lambda port: b"OK 1073741824\n", seen)
        try:
            assert await _roundtrip(f"fc:{uds}:52", b"hello guest") == b"hello guest"
        finally:
            server.close()

    run(main, loop_kind)
    assert seen == [b"CONNECT 52\n"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [(lambda port: None, "fc_handshake"), (lambda port: b"NO such port\n", "fc_refused")],
)
def test_fc_connect_refused_is_a_clear_error_without_fd_leak(tmp_path, answer, reason):
    uds = str(tmp_path / "v.sock")

    async def main() -> None:
        server = await _fake_muxer(uds, answer, [])
        try:
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(20):
                with pytest.raises(TransportError) as err:
                    await open_stream(f"fc:{uds}:52", timeout_s=2)
                assert err.value.reason == reason and "52" in str(err.value)
            await asyncio.sleep(0.05)
            assert len(os.listdir("/proc/self/fd")) == before
        finally:
            server.close()

    run(main)


def test_fc_connect_times_out_when_muxer_never_answers(tmp_path):
    uds = str(tmp_path / "v.sock")

    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_unix_server(silent, path=uds)
        try:
            with pytest.raises(TransportError) as err:
                await open_stream(f"fc:{uds}:52", timeout_s=0.2)
            assert err.value.reason == "timeout"
        finally:
            server.close()

    run(main)


def test_connect_errors_name_the_address(tmp_path):
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()

    async def main() -> None:
        with pytest.raises(TransportError) as missing:
            await open_stream(f"unix:{tmp_path / 'nope.sock'}")
        assert missing.value.reason == "not_found" and "nope.sock" in str(missing.value)
        with pytest.raises(TransportError) as refused:
            await open_stream(f"unix:{dead}")
        assert refused.value.reason == "refused"
        with pytest.raises(TransportError) as udp:
            await open_stream("udp:127.0.0.1:123")
        assert udp.value.reason == "bad_address"

    run(main)


def test_udp_endpoint_receives_from_peer_only():
    async def main() -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        got: list[tuple[bytes, int]] = []
        ep = await open_udp(parse_address(f"udp:127.0.0.1:{server.getsockname()[1]}"),
                            lambda data, rx: got.append((data, rx)))
        try:
            sent_ns = ep.send(b"q")
            data, client = server.recvfrom(100)
            assert data == b"q"
            intruder.sendto(b"spoof", client)
            server.sendto(b"answer", client)
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert [d for d, _ in got] == [b"answer"]
            assert got[0][1] >= sent_ns
        finally:
            ep.close()
            server.close()
            intruder.close()

    run(main)
