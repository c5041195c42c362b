"""The guest's relay protocol without sockets: feed the relay's bytes, check the events (as h11
tests a connection). The relay's side of each exchange is built with the same framing codec
the relay uses."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from relay_helpers import FakeUpstream, client_packet

from guest_client.link_protocol import (
    HelloAccepted,
    LinkProtocol,
    Refused,
    RelayFailure,
    RelayProtocolError,
    RelayReply,
    RequestDone,
    StreamFrame,
    Upstream,
)
from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd import framing
from timesyncd.framing import ErrorCode, FrameDecoder, FrameType, FramingError

Proto = LinkProtocol[str, str]
RELAY_HELLO = framing.relay_hello(["udp:10.0.0.1:123", "local"], ["tcp:ke.example:4460"]).encode()


def up(**kw: object) -> Proto:
    p: Proto = LinkProtocol("vm-1", request_timeout_s=2.5, **kw)  # type: ignore[arg-type]
    p.connection_made()
    (event,) = p.receive_data(RELAY_HELLO, 0)
    assert isinstance(event, HelloAccepted)
    return p


def sent(p: Proto, upstream: int = 0, token: str = "a") -> int:
    prepared = p.prepare_request(upstream, client_packet())
    assert not isinstance(prepared, Refused)
    rid, data = prepared
    (frame,) = FrameDecoder().feed(data)
    assert frame.type == FrameType.NTP_REQUEST and frame.request_id == rid
    assert framing.parse_ntp_request(frame)[0] == upstream
    p.track(rid, token)
    return rid


def test_hello_carries_name_version_and_deadline_and_completes_byte_by_byte() -> None:
    p: Proto = LinkProtocol("vm-1", request_timeout_s=2.5)
    (frame,) = FrameDecoder().feed(p.connection_made())
    hello = framing.parse_guest_hello(frame)  # the relay's own parser
    assert (hello.name, hello.request_timeout_s) == ("vm-1", 2.5)
    assert not p.up and p.prepare_request(0, b"x") == Refused("send_not_connected",
                                                               "relay_not_connected")
    events = [e for i in range(len(RELAY_HELLO))
              for e in p.receive_data(RELAY_HELLO[i:i + 1], i)]
    assert len(events) == 1 and isinstance(events[0], HelloAccepted) and p.up
    assert events[0].upstreams == [Upstream(0, "udp:10.0.0.1:123"), Upstream(1, "local")]
    assert events[0].info["nts_ke"] == [{"index": 0, "name": "tcp:ke.example:4460"}]


@pytest.mark.parametrize(("reply", "reason", "exc"), [
    (b"", "closed", RelayProtocolError),
    (framing.error(0, ErrorCode.BUSY, "full").encode(), "relay_busy", RelayProtocolError),
    (framing.ntp_reply(1, b"x" * 48, 0, 0).encode(), "unexpected_frame", RelayProtocolError),
    (framing.json_frame(FrameType.HELLO, 0, {"version": framing.VERSION + 1,
                                             "upstreams": []}).encode(), "bad_hello", FramingError),
    (framing.json_frame(FrameType.HELLO, 0, {"version": framing.VERSION,
                                             "upstreams": [{"index": 300, "name": "x"}]}).encode(),
     "bad_hello", FramingError),
])
def test_a_bad_hello_answer_ends_the_connection_with_a_named_reason(
        reply: bytes, reason: str, exc: type[Exception]) -> None:
    p: Proto = LinkProtocol("vm-1")
    p.connection_made()
    with pytest.raises(exc) as info:
        p.receive_data(reply, 0)
    assert info.value.reason == reason and not p.up  # type: ignore[attr-defined]


def test_frames_behind_the_hello_in_one_read_are_unsolicited() -> None:
    p: Proto = LinkProtocol("vm-1")
    p.connection_made()
    extra = framing.ntp_reply(1, b"x" * 48, 0, 0).encode()
    events = p.receive_data(RELAY_HELLO + extra * 2, 0)
    assert [type(e) for e in events] == [HelloAccepted]
    assert p.counters["unsolicited_frame"] == 2


def test_replies_get_the_stamp_of_the_bytes_that_completed_them() -> None:
    p = up()
    a, b = sent(p, 0, "a"), sent(p, 1, "b")
    ra = framing.ntp_reply(a, b"A" * 48, 11, 22).encode()
    rb = framing.ntp_reply(b, b"B" * 48, 0, 0).encode()
    first = p.receive_data(ra + rb[:5], 100)
    second = p.receive_data(rb[5:], 200)
    assert first == [RequestDone(a, "a", RelayReply(b"A" * 48, 11, 22, 100))]
    assert second == [RequestDone(b, "b", RelayReply(b"B" * 48, 0, 0, 200))]
    assert p.receive_data(ra, 300) == [] and p.counters["unsolicited_reply"] == 1
    assert p.pending == 0


def test_errors_fail_their_request_and_unknown_ids_are_counted() -> None:
    p = up()
    rid = sent(p)
    events = p.receive_data(framing.error(rid, ErrorCode.RATE_LIMITED, "slow\x1b down")
                            .encode(), 5)
    assert events == [RequestDone(rid, "a", RelayFailure("relay_rate_limited", "slow? down"))]
    assert p.receive_data(framing.error(999, 77, "?").encode(), 6) == []
    assert p.counters["error_unknown_id"] == 1 and p.counters["relay_error"] == 1
    malformed = framing.Frame(FrameType.NTP_REPLY, sent(p), b"short").encode()
    (done,) = p.receive_data(malformed, 7)
    assert isinstance(done, RequestDone) and isinstance(done.result, RelayFailure)
    assert done.result.reason.startswith("malformed_reply:")


def test_cancelled_and_expired_requests() -> None:
    p = up()
    rid = sent(p)
    assert p.forget(rid) == "a" and p.expire(rid) is None
    rid = sent(p)
    done = p.expire(rid)
    assert done is not None and done.result == RelayFailure("timeout", "no reply in 2.5 s")
    assert p.counters["timeout"] == 1 and p.pending == 0


def test_refusals_are_counted_with_the_reason_for_the_caller() -> None:
    p = up(max_pending=1)
    sent(p)
    assert p.prepare_request(0, client_packet()) == Refused("send_busy", "send_busy")
    p2 = up()
    assert p2.prepare_request(0, b"x" * 5000) == Refused("send_oversized", "send_oversized")
    assert p.counters["send_busy"] == 1 and p2.counters["send_oversized"] == 1


def test_request_ids_are_shared_by_streams_and_wrap_past_zero() -> None:
    p = up()
    p._next_id = 0xFFFF_FFFF
    assert p.new_request_id() == 0xFFFF_FFFF and p.open_stream("s") == 1 and sent(p) == 2


def test_stream_frames_and_a_close_crossing_ours() -> None:
    p = up()
    sid = p.open_stream("ke")
    assert sid is not None
    data = framing.Frame(FrameType.STREAM_DATA, sid, b"tls").encode()
    (ev,) = p.receive_data(data, 1)
    assert isinstance(ev, StreamFrame) and (ev.token, ev.frame.payload, ev.ended) == (
        "ke", b"tls", False)
    close = p.close_stream(sid, "done")
    assert close is not None and FrameDecoder().feed(close)[0].type == FrameType.STREAM_CLOSE
    assert p.close_stream(sid) is None  # once
    # the relay's own close crossing ours, and late data: the normal end, not an error
    late = data + framing.stream_close(sid, "").encode()
    assert p.receive_data(late, 2) == [] and not any(
        k.startswith("ignored") for k in p.counters)
    sid2 = p.open_stream("ke2")
    assert sid2 is not None
    (ev,) = p.receive_data(framing.stream_close(sid2, "eof").encode(), 3)
    assert isinstance(ev, StreamFrame) and ev.ended
    assert p.receive_data(framing.stream_close(sid2, "").encode(), 4) == []  # 2nd: ignored
    assert p.counters["ignored_frame_8"] == 1


def test_connection_lost_fails_requests_and_closes_streams() -> None:
    p = up()
    rid, sid = sent(p), p.open_stream("ke")
    events = p.connection_lost("closed by relay")
    assert events[0] == RequestDone(rid, "a", RelayFailure("connection_lost", "closed by relay"))
    assert isinstance(events[1], StreamFrame) and events[1].stream_id == sid and events[1].ended
    assert framing.parse_stream_close(events[1].frame) == "connection_lost"
    assert p.counters["lost_in_flight"] == 1 and not p.up and p.pending == 0
    p.connection_made()  # a reconnect starts with a fresh decoder and a new HELLO
    assert not p.up and isinstance(p.receive_data(RELAY_HELLO, 9)[0], HelloAccepted)
    stopped = up()
    sent(stopped)
    assert len(stopped.connection_lost("stopped", counted=False)) == 1
    assert stopped.counters["lost_in_flight"] == 0


def test_the_relay_drops_requests_queued_past_the_deadline_the_guest_announced(tmp_path) -> None:
    """Issue 8 end to end: the guest's HELLO (its real bytes) carries its request deadline, so
    a relay whose loop stood still 1.2 s drops the requests queued meanwhile as stale even
    though its own default (``stale_request_s``, 5 s) would still forward them."""
    sock = tmp_path / "relay.sock"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_datagram_endpoint(FakeUpstream,
                                                          local_addr=("127.0.0.1", port))
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",),
                                           upstreams=(f"udp:127.0.0.1:{port}",)))
        await relay.start()
        raw = socket.socket(socket.AF_UNIX)
        try:
            raw.connect(str(sock))
            raw.sendall(LinkProtocol("t", request_timeout_s=0.5).connection_made())
            await asyncio.sleep(0.3)
            raw.settimeout(2)
            decoder = FrameDecoder()
            assert decoder.feed(raw.recv(65536))[0].type == FrameType.HELLO

            def guest_meanwhile() -> None:  # while the relay's loop is frozen
                time.sleep(0.2)
                raw.sendall(framing.ntp_request(1, 0, client_packet()).encode())

            thread = threading.Thread(target=guest_meanwhile)
            thread.start()
            time.sleep(1.2)  # the loop stands still (what SIGSTOP or a frozen host does)
            thread.join()
            await asyncio.sleep(0.3)
            (frame,) = decoder.feed(raw.recv(65536))
            assert framing.parse_error(frame)[0] == ErrorCode.UPSTREAM_TIMEOUT
            assert relay.stats.stale_requests == 1 and upstream.received == []
        finally:
            raw.close()
            await relay.stop()
            upstream.close()

    asyncio.run(main())
