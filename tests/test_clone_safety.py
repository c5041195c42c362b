"""Issue 15, clone safety: two guests started from one saved state never send the same NTS
cookie (the generation change discards keys and cookies and runs NTS-KE again), and no
``random.Random`` (whose state a clone shares) feeds a transmit timestamp, nonce or cookie."""

from __future__ import annotations

import copy
import os
import random

import pytest

from guest_client.actions import SendRequest
from guest_client.clocks import SoftwareClock
from guest_client.controller import GuestController
from guest_client.daemon import GuestDaemon
from guest_client.disruption import VM_GENERATION
from guest_client.nts_manager import NtsManager
from guest_client.nts_source import parse_nts_server
from guest_client.settings import GuestSettings
from guest_client.vmclock_watch import reset_sessions
from timesyncd.nts.ke_session import NtsKeResult
from timesyncd.packet import ExtType, NtpPacket, decode

UPSTREAMS = {"udp:127.0.0.1:123": 0}


def ke_result() -> NtsKeResult:
    """What a KE server hands out: fresh keys and unique cookies every time."""
    return NtsKeResult(15, os.urandom(32), os.urandom(32),
                       tuple(os.urandom(64) for _ in range(8)), "127.0.0.1", 123)


def manager() -> NtsManager:
    m = NtsManager([parse_nts_server("time.example")], cafile=None, clock=SoftwareClock(),
                   is_synchronised=lambda: False, on_reply=lambda *a: None,
                   on_error=lambda *a: None, on_sent=lambda *a: None)
    (src,) = m.sources.values()
    assert src.on_ke_result(ke_result(), UPSTREAMS)
    return m


def cookies_sent(m: NtsManager, n: int) -> list[bytes]:
    (src,) = m.sources.values()
    out = []
    for _ in range(n):
        wrapped = src.wrap(NtpPacket(mode=3, transmit_ts=1).encode())
        assert isinstance(wrapped, bytes), wrapped
        out += [ef.body for ef in decode(wrapped).extensions if ef.type == ExtType.NTS_COOKIE]
    return out


@pytest.mark.parametrize("generation_change_seen", [True, False])
def test_two_guests_from_one_saved_state_never_send_the_same_cookie(
        generation_change_seen: bool) -> None:
    saved = manager()
    saved_cookies = cookies_sent(copy.deepcopy(saved), 8)
    sent = []
    for _ in range(2):  # two guests restored from the one snapshot
        guest = copy.deepcopy(saved)
        if generation_change_seen:
            reset_sessions(guest, None, VM_GENERATION)  # what the daemon does on the change
            (src,) = guest.sources.values()
            assert not src.ready and src.counters["discarded_on_restore"] == 1
            assert src.on_ke_result(ke_result(), UPSTREAMS)  # NTS-KE again
        sent.append(cookies_sent(guest, 8))
    shared = set(sent[0]) & set(sent[1])
    if generation_change_seen:
        assert not shared and not set(sent[0]) & set(saved_cookies)
    else:  # the hazard the reset removes: both clones spend the snapshot's cookies
        assert shared == set(saved_cookies)


def test_no_random_random_feeds_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's transmit timestamps come from the OS generator (SystemRandom overrides
    these methods; a plain random.Random, seeded or copied with the snapshot, would hit the
    patched ones); NTS nonces and Unique Identifiers from os.urandom."""
    daemon = GuestDaemon(GuestSettings(servers=("udp:127.0.0.1:123",), clock="software",
                                       nts_servers=("time.example",), status_socket=""),
                         SoftwareClock())
    for name in ("getrandbits", "random", "randbytes", "randrange", "choice"):
        monkeypatch.setattr(random.Random, name, _forbidden)
    ctl: GuestController = daemon.controller
    actions = ctl.start(0) + ctl.on_timer(0)
    stamps = {decode(a.data).transmit_ts for a in actions if isinstance(a, SendRequest)}
    assert stamps and all(stamps)
    (src,) = daemon.nts.sources.values()
    assert src._random is os.urandom
    assert src.on_ke_result(ke_result(), UPSTREAMS)
    assert isinstance(src.wrap(NtpPacket(mode=3, transmit_ts=5).encode()), bytes)
    # and the check itself bites: a controller on a plain random.Random fails it
    plain = GuestController(ctl.config, random.Random(1), [ctl._sources[n].config
                                                          for n in ctl._sources])
    with pytest.raises(AssertionError, match="random.Random"):
        plain.start(0)
        plain.on_timer(0)


def _forbidden(*_args: object, **_kw: object) -> int:
    raise AssertionError("a random.Random instance fed a wire secret")
