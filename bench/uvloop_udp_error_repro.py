"""The minimal form of the uvloop fault the relay's upstream works around (issue 8).

A connected UDP socket to a closed loopback port, watched with ``loop.add_reader``: one send
draws an ICMP port unreachable (the reader's ``recv`` raises ConnectionRefusedError); then a
responder binds that port and answers three more requests. asyncio delivers the three
replies; uvloop delivers none (its poll handle stops after the error). Removing and adding
the reader again, or a fresh socket, makes uvloop deliver again; ``host_relay.upstream``
replaces the socket.

    python bench/uvloop_udp_error_repro.py

Prints what each loop's reader saw. Loopback only, about one second.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop


async def scenario(readd_after_error: bool) -> list[str]:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there now
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    seen: list[str] = []

    def readable() -> None:
        try:
            seen.append(sock.recv(100).decode())
        except BlockingIOError:
            pass
        except OSError as exc:
            seen.append(type(exc).__name__)
            if readd_after_error:
                loop.remove_reader(sock.fileno())
                loop.add_reader(sock.fileno(), readable)

    loop.add_reader(sock.fileno(), readable)
    sock.send(b"request")
    await asyncio.sleep(0.2)
    responder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    responder.bind(("127.0.0.1", port))
    for i in range(3):
        sock.send(b"request")
        _, addr = responder.recvfrom(100)
        responder.sendto(f"reply{i}".encode(), addr)
    await asyncio.sleep(0.3)
    loop.remove_reader(sock.fileno())
    sock.close()
    responder.close()
    return seen


def main() -> None:
    runners: dict[str, Callable[[Coroutine[Any, Any, list[str]]], list[str]]] = {
        "asyncio": asyncio.run, "uvloop": uvloop.run}
    for name, runner in runners.items():
        for readd in (False, True):
            seen = runner(scenario(readd))
            how = "reader re-added after the error" if readd else "reader left as is"
            print(f"{name:8} {how:34} saw: {', '.join(seen)}")


if __name__ == "__main__":
    main()
