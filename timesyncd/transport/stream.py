"""Stream listen/connect for ``vsock:``, ``unix:``, ``fc:`` and ``tcp:`` addresses.

Both sides get plain asyncio streams (or, listening, a protocol) whatever the address kind,
so the relay and the guest never branch on transport. ``fc:UDS:PORT`` follows Firecracker's
hybrid vsock: the host side listens on ``UDS_PORT`` (where Firecracker delivers guest
connections to vsock port PORT) and a host-side client connects to ``UDS`` and speaks
``CONNECT PORT`` / ``OK <n>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from timesyncd.addresses import Address, parse_address
from timesyncd.transport.errors import TransportError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ProtocolFactory = Callable[[], asyncio.Protocol]

#: Longest line a Firecracker muxer answers to CONNECT ("OK <u32>\n" is far shorter).
_FC_MAX_LINE = 64
DEFAULT_LIMIT = 64 * 1024


def _as_address(address: Address | str) -> Address:
    return parse_address(address) if isinstance(address, str) else address


def _vsock_family() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise TransportError("unsupported", "AF_VSOCK is not available on this platform")
    return int(family)


# --- connect ---------------------------------------------------------------------------


async def open_stream(
    address: Address | str, *, timeout_s: float = 5.0, limit: int = DEFAULT_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a stream address; raise :class:`TransportError` naming it on failure.

    The whole connect (including the Firecracker handshake) is bounded by ``timeout_s``;
    on any failure the socket is closed before the error propagates.
    """
    addr = _as_address(address)
    if not addr.is_stream:
        raise TransportError("bad_address", f"{addr} is not a stream address")
    try:
        async with asyncio.timeout(timeout_s):
            if addr.kind == "unix":
                return await asyncio.open_unix_connection(addr.path, limit=limit)
            if addr.kind == "tcp":
                return await asyncio.open_connection(addr.host, addr.port, limit=limit)
            if addr.kind == "fc":
                return await _open_fc(addr, limit)
            return await _open_vsock(addr, limit)
    except TransportError:
        raise
    except TimeoutError as exc:
        raise TransportError("timeout", f"connect to {addr} timed out after {timeout_s}s") from exc
    except FileNotFoundError as exc:
        raise TransportError("not_found", f"connect to {addr}: no socket at that path") from exc
    except ConnectionRefusedError as exc:
        raise TransportError("refused", f"connect to {addr}: connection refused") from exc
    except PermissionError as exc:
        raise TransportError("permission", f"connect to {addr}: permission denied") from exc
    except OSError as exc:
        raise TransportError("os_error", f"connect to {addr}: {exc.strerror or exc}") from exc


async def _open_fc(
    addr: Address, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(addr.path, limit=limit)
    try:
        writer.write(f"CONNECT {addr.port}\n".encode())
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        writer.close()
        raise TransportError(
            "fc_handshake", f"connect to {addr}: muxer closed during CONNECT {addr.port}"
        ) from exc
    except BaseException:
        writer.close()
        raise
    words = line.split()
    if len(line) > _FC_MAX_LINE or len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
        writer.close()
        raise TransportError(
            "fc_refused",
            f"connect to {addr}: muxer answered {line[:_FC_MAX_LINE]!r} to CONNECT {addr.port}, "
            "expected 'OK <port>' (is a guest listening on that vsock port?)",
        )
    return reader, writer


async def _open_vsock(
    addr: Address, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(_vsock_family(), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (addr.cid, addr.port))
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


# --- listen ----------------------------------------------------------------------------


class HandlerTasks:
    """The per-connection handler tasks of a stream server, so closing it can end them:
    on Python 3.11 ``Server.close``/``wait_closed`` leave accepted connections running."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    def wrap(self, handler: Handler) -> Handler:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if self.closing or task is None:  # accepted just as the server closed
                writer.close()
                return
            self.tasks.add(task)
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:
                # ended by close(): finish normally (asyncio's stream callback reports a
                # cancelled handler as an error); any other cancel is not ours to eat
                if not self.closing:
                    raise
            finally:
                self.tasks.discard(task)
                writer.close()

        return tracked

    async def cancel_all(self, timeout_s: float = 2.0) -> None:
        self.closing = True
        tasks, self.tasks = self.tasks, set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


class StreamListener:
    """A listening stream socket for one address; ``close`` also unlinks a socket file it made.

    ``bound`` is the address actually bound (a ``tcp:`` port 0 becomes the real port).
    For :func:`listen_stream` servers, ``close`` also ends connections in progress.
    """

    def __init__(
        self, address: Address, bound: Address, server: asyncio.AbstractServer,
        owned_path: tuple[str, int, int] | None,
    ) -> None:
        self.address = address
        self.bound = bound
        self._server = server
        self._owned_path = owned_path
        self.handlers: HandlerTasks | None = None  # set by listen_stream

    async def close(self) -> None:
        """Stop accepting; end :func:`listen_stream` handlers still running (protocol
        servers close their own connections)."""
        if self.handlers is not None:
            self.handlers.closing = True
        self._server.close()
        if self.handlers is not None:
            await self.handlers.cancel_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._unlink()

    def _unlink(self) -> None:
        if self._owned_path is None:
            return
        path, dev, ino = self._owned_path
        self._owned_path = None
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):  # still ours, not a successor's
                os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` only if it is a socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(
            "path_not_socket", f"{path} exists and is not a socket; refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left behind by a process that died
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # timeout or full backlog: someone is there
    finally:
        probe.close()
    raise TransportError("address_in_use", f"unix:{path} is in use by a running listener")


def _bind_unix(path: str, backlog: int, mode: int | None) -> tuple[socket.socket, int, int]:
    # one rule for every socket file (relay listen, guest status): the folder must exist.
    # Creating it would pick its owner and mode for the admin; systemd's RuntimeDirectory=
    # or the deploy scripts' mkdir do that on purpose (docs/DEPLOYMENT.md).
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise TransportError("no_folder", f"listen on unix:{path}: folder {parent} does not "
                             "exist; create it first (systemd: RuntimeDirectory=timesync)")
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        st = os.lstat(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, st.st_dev, st.st_ino


async def listen_stream(
    address: Address | str, handler: Handler, *, backlog: int = 1024,
    limit: int = DEFAULT_LIMIT, socket_mode: int | None = None,
) -> StreamListener:
    """Listen on a stream address and run ``handler(reader, writer)`` per connection.

    Convenience over :func:`listen_protocol` for code that prefers streams to protocols.
    """
    loop = asyncio.get_running_loop()
    handlers = HandlerTasks()
    tracked = handlers.wrap(handler)

    def factory() -> asyncio.Protocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=limit, loop=loop),
                                            tracked, loop=loop)

    listener = await listen_protocol(address, factory, backlog=backlog, socket_mode=socket_mode)
    listener.handlers = handlers
    return listener


async def listen_protocol(
    address: Address | str, protocol_factory: ProtocolFactory, *, backlog: int = 1024,
    socket_mode: int | None = None,
) -> StreamListener:
    """Listen on a stream address; each accepted connection gets ``protocol_factory()``.

    Protocols let a busy server (the relay) handle bytes in ``data_received`` without a task
    switch per read. ``backlog`` is passed to the loop too (asyncio re-``listen``s a given
    socket with its own default of 100, too few for a burst of guests). ``unix:`` and ``fc:``
    paths: a stale socket file is removed first (never a regular file or a socket with a live
    listener); ``socket_mode`` sets the file's permissions.
    """
    addr = _as_address(address)
    if not addr.is_stream:
        raise TransportError("bad_address", f"{addr} is not a stream address")
    loop = asyncio.get_running_loop()
    try:
        if addr.kind in ("unix", "fc"):
            path = addr.listen_path
            sock, dev, ino = _bind_unix(path, backlog, socket_mode)
            try:
                server = await loop.create_unix_server(protocol_factory, sock=sock,
                                                       backlog=backlog)
            except BaseException:
                sock.close()
                raise
            return StreamListener(addr, addr, server, (path, dev, ino))
        if addr.kind == "tcp":
            server = await loop.create_server(
                protocol_factory, addr.host, addr.port, backlog=backlog, reuse_address=True
            )
            host, port = server.sockets[0].getsockname()[:2]
            return StreamListener(addr, Address("tcp", host=host, port=port), server, None)
        sock = socket.socket(_vsock_family(), socket.SOCK_STREAM)
        try:
            sock.bind((addr.cid, addr.port))
            sock.listen(backlog)
            sock.setblocking(False)
            server = await loop.create_server(protocol_factory, sock=sock, backlog=backlog)
        except BaseException:
            sock.close()
            raise
        port = sock.getsockname()[1]
        return StreamListener(addr, Address("vsock", cid=addr.cid, port=port), server, None)
    except TransportError:
        raise
    except PermissionError as exc:
        raise TransportError("permission", f"listen on {addr}: permission denied") from exc
    except OSError as exc:
        raise TransportError("os_error", f"listen on {addr}: {exc.strerror or exc}") from exc
