"""Guest identity as the host knows it, and what is kept of a guest after it leaves."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from loops import LOOPS, run
from prometheus_client.parser import text_string_to_metric_families
from relay_helpers import Guest

from host_relay.guest_registry import GuestRegistry
from host_relay.service import RelayService
from host_relay.settings import RelaySettings

pytestmark = pytest.mark.timeout(30)
S = 1_000_000_000


class Peer:
    """A transport's extra info, as the registry reads it."""

    def __init__(self, **info: Any) -> None:
        self.info = info

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.info.get(name, default)


def test_left_guests_are_kept_for_the_ttl_and_bounded_in_number() -> None:
    reg = GuestRegistry(gone_ttl_s=10.0, max_gone=3)
    conns = [object() for _ in range(5)]
    for i, conn in enumerate(conns):
        reg.connect(conn, Peer(peername=(f"10.0.0.{i}", 1), socket=None), f"g{i}", 0)
    for i, conn in enumerate(conns):
        reg.disconnect(conn, now_mono_ns=i * S)
    # five left, three kept: the oldest two forgotten first
    assert [g.name for g in reg.gone(5 * S)] == ["g2", "g3", "g4"]
    assert [g.name for g in reg.gone(13 * S)] == ["g3", "g4"]  # g2 left at 2 s: past the TTL
    assert reg.gone(100 * S) == []


def test_a_guest_that_comes_back_is_no_longer_missing() -> None:
    reg = GuestRegistry()
    first, second = object(), object()
    peer = Peer(sockname="/run/fc/vm1.sock_123")
    one_guest = GuestRegistry(["/run/fc/vm1.sock_123"])
    rec = one_guest.connect(first, peer, "vm1", 0)
    assert rec.guest == "fc:/run/fc/vm1.sock_123"  # stable across reconnects: the VM's socket
    one_guest.disconnect(first, now_mono_ns=S)
    assert [g.guest for g in one_guest.gone(2 * S)] == [rec.guest]
    assert one_guest.connect(second, peer, "vm1", 3 * S).guest == rec.guest
    assert one_guest.gone(4 * S) == []
    # a plain Unix socket shared by many clients does not name the guest by the socket
    assert reg.connect(first, peer, "x", 0).guest == "conn:1"


def test_a_peer_is_missing_only_when_its_last_connection_closes() -> None:
    """A guest that reconnects before its old connection is noticed gone holds two (the second
    named ``PEER/N``); the old one closing must not make the guest look missing."""
    reg = GuestRegistry()
    old, new = object(), object()
    vsock = SimpleNamespace(family=getattr(socket, "AF_VSOCK", 40))  # no real vsock socket
    peer = Peer(peername=(3, 123), socket=vsock)
    first = reg.connect(old, peer, "vm", 0)
    second = reg.connect(new, peer, "vm", S)
    assert second.guest.startswith(first.guest + "/") and second.peer == first.guest
    reg.disconnect(old, now_mono_ns=2 * S)
    assert reg.gone(3 * S) == []
    reg.disconnect(new, now_mono_ns=4 * S)
    assert first.guest == "cid:3"
    assert [g.guest for g in reg.gone(5 * S)] == ["cid:3"]  # the peer, not "cid:3/N"


def test_unix_peers_are_named_by_their_process(tmp_path: Path) -> None:
    """SO_PEERCRED: the pid the kernel recorded for the connecting process."""
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    conn, _ = server.accept()
    try:
        rec = GuestRegistry().connect(object(), Peer(peername="", socket=conn), "x", 0)
        assert rec.guest == f"unix:pid:{os.getpid()}"
    finally:
        for s in (conn, client, server):
            s.close()


def test_relay_labels_firecracker_guests_by_socket_and_keeps_them_after_they_leave(
        tmp_path: Path) -> None:
    async def main() -> None:
        uds = tmp_path / "v.sock"
        relay = RelayService(RelaySettings(listen=(f"fc:{uds}:123",), metrics="tcp:127.0.0.1:0"))
        await relay.start()
        try:
            g = await Guest.connect(f"unix:{uds}_123", name="vm-one")
            await g.close()
            async with asyncio.timeout(3):
                while len(relay.guests):
                    await asyncio.sleep(0.01)
            text = relay.render_metrics().decode()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            ident = f"fc:{uds}_123"
            assert samples[("timesync_guest_up", (("guest", ident),))] == 0
            assert samples[("timesync_guest_info", (("guest", ident), ("name", "vm-one")))] == 1
        finally:
            await relay.stop()

    asyncio.run(main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_relay_names_unix_guests_by_peer_process_under_each_loop(
        tmp_path: Path, loop_kind: str) -> None:
    """The transport's socket (asyncio's TransportSocket, uvloop's pseudo-socket) gives the
    peer credentials on both loops; a reconnect from the same process is the same guest."""
    async def main() -> None:
        sock = tmp_path / "r.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        try:
            for _ in range(2):
                g = await Guest.connect(f"unix:{sock}", name="x")
                (rec,) = relay.guests.records()
                assert rec.guest == f"unix:pid:{os.getpid()}"
                await g.close()
                async with asyncio.timeout(3):
                    while len(relay.guests):
                        await asyncio.sleep(0.01)
            now = time.monotonic_ns()
            assert [g.guest for g in relay.guests.gone(now)] == [f"unix:pid:{os.getpid()}"]
        finally:
            await relay.stop()

    run(main, loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_the_relay_asks_the_transport_about_a_guest_once(tmp_path: Path, loop_kind: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection set-up cost: under uvloop each extra-info question (SO_PEERCRED above all)
    builds a socket object, so the per-guest limit and the registry share one answer."""
    from host_relay.connection import GuestConnection

    asked: list[str] = []
    real = GuestConnection.get_extra_info

    def counting(self: GuestConnection, name: str, default: Any = None) -> Any:
        asked.append(name)
        return real(self, name, default)

    monkeypatch.setattr(GuestConnection, "get_extra_info", counting)

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=[f"unix:{tmp_path}/r.sock"], upstreams=[]))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{tmp_path}/r.sock")
            (record,) = relay.guests.records()
            assert record.guest == f"unix:pid:{os.getpid()}"
            await guest.close()
        finally:
            await relay.stop()

    run(main, loop_kind)
    assert sorted(asked) == sorted(["peername", "sockname", "socket"]), asked


def test_the_fd_budget_skips_the_sum_only_far_from_the_limit() -> None:
    """``room`` lets the accept path skip :meth:`FdBudget.short`; during a refusal episode it
    must not, or the end of the episode would never be logged."""
    from collections import Counter

    from host_relay.descriptors import HEADROOM, FdBudget, FdLimit

    budget = FdBudget(Counter())
    budget.limit = FdLimit(200, 200, 200)
    budget.base = 10
    budget.measure_base(spare=20)
    base = budget.base
    assert budget.room == 200 - base - HEADROOM - 20
    assert budget.short(200 - base - HEADROOM)  # at the margin: refused
    assert budget.room < 0  # every check goes through short() until the episode ends
    assert not budget.short(0) and budget.refused == 0
    assert budget.room == 200 - base - HEADROOM - 20
