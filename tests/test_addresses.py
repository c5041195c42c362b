"""Address parsing: every accepted form, and malformed ones get a message naming the forms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from timesyncd.addresses import (
    ACCEPTED_FORMS,
    VMADDR_CID_ANY,
    Address,
    AddressError,
    parse_address,
)


@pytest.mark.parametrize(("spec", "expected"), [
    ("vsock:3:5000", Address("vsock", cid=3, port=5000)),
    ("vsock:2:123", Address("vsock", cid=2, port=123)),
    ("vsock:any:5000", Address("vsock", cid=VMADDR_CID_ANY, port=5000)),
    ("vsock:4294967295:1", Address("vsock", cid=VMADDR_CID_ANY, port=1)),
    ("vsock:3:4294967295", Address("vsock", cid=3, port=0xFFFF_FFFF)),
    ("unix:/run/timesync/relay.sock", Address("unix", path="/run/timesync/relay.sock")),
    ("unix:relative:with:colons", Address("unix", path="relative:with:colons")),
    ("fc:/srv/vm1/v.sock:5000", Address("fc", path="/srv/vm1/v.sock", port=5000)),
    ("fc:/a:b/v.sock:7", Address("fc", path="/a:b/v.sock", port=7)),
    ("tcp:127.0.0.1:8123", Address("tcp", host="127.0.0.1", port=8123)),
    ("tcp:localhost:0", Address("tcp", host="localhost", port=0)),
    ("udp:127.0.0.1:123", Address("udp", host="127.0.0.1", port=123)),
    ("udp:[::1]:123", Address("udp", host="::1", port=123)),
    ("udp:time.example.org:65535", Address("udp", host="time.example.org", port=65535)),
])
def test_accepted_forms(spec: str, expected: Address) -> None:
    addr = parse_address(spec)
    assert addr == expected
    assert parse_address(str(addr)) == addr  # str() gives back a parseable form


def test_properties() -> None:
    assert parse_address("fc:/srv/v.sock:5000").listen_path == "/srv/v.sock_5000"
    assert parse_address("unix:/r.sock").listen_path == "/r.sock"
    assert not parse_address("udp:127.0.0.1:123").is_stream
    assert all(parse_address(s).is_stream for s in ("tcp:h:1", "unix:/x", "vsock:3:1"))
    assert str(parse_address("vsock:any:9")) == "vsock:any:9"
    assert str(parse_address("udp:[::1]:123")) == "udp:[::1]:123"


@pytest.mark.parametrize("spec", [
    "", "udp", "udp:", "unix:", "bogus:1:2", "UDP:127.0.0.1:123",
    "vsock:3", "vsock:3:", "vsock:x:5000", "vsock:-1:5", "vsock:3:port",
    "vsock:4294967296:1", "vsock:99999999999:1", "vsock:3:4294967296",
    "vsock:٣:1", "vsock:3:²",  # unicode digits that int() would reject or misread
    "fc:5000", "fc::5000", "fc:/v.sock:", "fc:/v.sock:x",
    "tcp:127.0.0.1", "tcp::80", "tcp:127.0.0.1:", "tcp:127.0.0.1:+80", "tcp:h:65536",
    "udp:::1:123", "udp:[::1]", "udp:[::1:123", "udp:[]:123", "udp:h:" + "1" * 5000,
])
def test_malformed_addresses_name_the_accepted_forms(spec: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(spec)
    message = str(info.value)
    assert repr(spec) in message and ACCEPTED_FORMS in message


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_address_error(spec: str) -> None:
    try:
        addr = parse_address(spec)
    except AddressError:
        return
    assert addr.kind in ("vsock", "unix", "fc", "tcp", "udp")
    assert 0 <= addr.port <= 0xFFFF_FFFF and 0 <= addr.cid <= 0xFFFF_FFFF
    if addr.kind in ("tcp", "udp"):
        assert addr.port <= 0xFFFF
