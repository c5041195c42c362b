"""Status socket: one JSON line per request, bad requests answered and counted, never a crash."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from guest_client.status_server import StatusError, StatusServer, query_status


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    (tmp_path / "sub").mkdir()
    return str(tmp_path / "sub" / "guest.sock")


def raw_request(path: str, data: bytes, shutdown: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_status_roundtrip_and_errors(sock_path: str) -> None:
    status = {"state": "synchronised", "offset_s": 1e-4, "rejected": {"bad_mode": 2}}

    async def main() -> None:
        server = StatusServer(sock_path, lambda: status, mode=0o666)
        await server.start()
        try:
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o666
            assert await in_thread(query_status, sock_path, 2.0) == status
            # malformed requests: answered with an error, counted, server keeps serving
            bad = await in_thread(raw_request, sock_path, b"rm -rf /\n")
            assert b"bad_request" in bad
            huge = await in_thread(raw_request, sock_path, b"x" * 5000)
            assert b"oversized" in huge
            binary = await in_thread(raw_request, sock_path, b"\xff\x00\xfe\n")
            assert b"bad_request" in binary
            # a request without newline followed by EOF is still understood
            assert b"synchronised" in await in_thread(raw_request, sock_path, b"status")
            assert server.errors["bad_request"] == 2 and server.errors["oversized"] == 1
            assert await in_thread(query_status, sock_path, 2.0) == status
            assert server.served == 3
        finally:
            await server.stop()
        assert not os.path.exists(sock_path)

    asyncio.run(main())


def test_silent_client_times_out_without_blocking_others(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import guest_client.status_server as mod

    monkeypatch.setattr(mod, "REQUEST_TIMEOUT_S", 0.2)

    async def main() -> None:
        server = StatusServer(sock_path, lambda: {"state": "x"})
        await server.start()
        try:
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.connect(sock_path)
            assert (await in_thread(query_status, sock_path, 2.0)) == {"state": "x"}
            await asyncio.sleep(0.4)
            assert server.errors["timeout"] == 1
            silent.close()
        finally:
            await server.stop()

    asyncio.run(main())


def test_provider_exception_is_contained(sock_path: str) -> None:
    calls = {"n": 0}

    def provider() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return {"ok": True}

    async def main() -> None:
        server = StatusServer(sock_path, provider)
        await server.start()
        try:
            with pytest.raises(OSError):
                await in_thread(query_status, sock_path, 2.0)
            assert server.errors["internal"] == 1
            assert await in_thread(query_status, sock_path, 2.0) == {"ok": True}
        finally:
            await server.stop()

    asyncio.run(main())


def test_stale_socket_replaced_live_socket_refused(sock_path: str) -> None:
    Path(sock_path).parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # file left behind, nobody listening

    async def main() -> None:
        first = StatusServer(sock_path, lambda: {"n": 1})
        await first.start()
        try:
            second = StatusServer(sock_path, lambda: {"n": 2})
            with pytest.raises(OSError, match="in use"):
                await second.start()
            assert await in_thread(query_status, sock_path, 2.0) == {"n": 1}
        finally:
            await first.stop()

    asyncio.run(main())


def test_regular_file_not_clobbered(sock_path: str) -> None:
    Path(sock_path).parent.mkdir(parents=True, exist_ok=True)
    Path(sock_path).write_text("precious")

    async def main() -> None:
        with pytest.raises(OSError, match="not a socket"):
            await StatusServer(sock_path, lambda: {}).start()

    asyncio.run(main())
    assert Path(sock_path).read_text() == "precious"
    os.unlink(sock_path)


def test_query_status_errors(sock_path: str) -> None:
    with pytest.raises(OSError):
        query_status(sock_path, 0.5)  # nothing there
    Path(sock_path).parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    import threading

    def serve(answer: bytes) -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.sendall(answer)
        conn.close()

    for answer, match in [(b"not json\n", "not JSON"), (b"[1,2]\n", "not a JSON object"),
                          (b'{"error":"bad_request: x"}\n', "refused")]:
        t = threading.Thread(target=serve, args=(answer,))
        t.start()
        with pytest.raises(StatusError, match=match):
            query_status(sock_path, 2.0)
        t.join()
    listener.close()
    os.unlink(sock_path)


def test_stop_ends_open_connections(sock_path: str) -> None:
    """An idle client must not keep a handler (and the provider) alive after stop(): closing
    the listener alone leaves accepted connections open on 3.11."""
    calls = {"n": 0}

    def provider() -> dict[str, Any]:
        calls["n"] += 1
        return {"state": "x"}

    def handlers() -> list[asyncio.Task[Any]]:
        # connection handlers run wrapped by the transport's HandlerTasks
        return [t for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "").startswith("HandlerTasks.")]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
        server = StatusServer(sock_path, provider)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(sock_path)
        try:
            for _ in range(200):  # bounded: the accept lands within a few iterations
                if handlers():
                    break
                await asyncio.sleep(0.01)
            assert handlers(), "the idle client was never accepted"
            await asyncio.wait_for(server.stop(), 2.0)
            assert handlers() == []
            assert await asyncio.wait_for(reader.read(100), 2.0) == b""  # EOF, not silence
            writer.write(b"status\n")
            await asyncio.sleep(0.05)
            assert calls["n"] == 0 and server.served == 0
            assert loop_errors == []  # no "Exception in callback" from a cancelled handler
        finally:
            writer.close()
            await server.stop()

    asyncio.run(main())
