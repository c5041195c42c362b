"""Parse the address forms the CLI and config accept (``vsock:``, ``unix:``, ``fc:``, ``tcp:``,
``udp:``) into values; no sockets are opened here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VMADDR_CID_ANY = 0xFFFF_FFFF
VMADDR_CID_HOST = 2

ACCEPTED_FORMS = (
    "vsock:CID:PORT (CID a number, or 'any' to listen on all), "
    "unix:PATH, fc:UDS_PATH:PORT (Firecracker hybrid vsock), "
    "tcp:HOST:PORT, udp:HOST:PORT (IPv6 as udp:[::1]:123)"
)

Kind = Literal["vsock", "unix", "fc", "tcp", "udp"]


class AddressError(ValueError):
    """A malformed address; the message names the accepted forms."""


@dataclass(frozen=True, slots=True)
class Address:
    kind: Kind
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0

    @property
    def is_stream(self) -> bool:
        return self.kind != "udp"

    @property
    def listen_path(self) -> str:
        """Where a listener binds for unix and fc (Firecracker delivers to ``UDS_PATH_PORT``)."""
        if self.kind == "fc":
            return f"{self.path}_{self.port}"
        return self.path

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fc":
            return f"fc:{self.path}:{self.port}"
        if self.kind == "vsock":
            cid = "any" if self.cid == VMADDR_CID_ANY else str(self.cid)
            return f"vsock:{cid}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


def _number(text: str) -> int | None:
    """ASCII decimal up to 32 bits, else None (``str.isdigit`` alone admits '²' and '٣')."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    value = int(text)
    return value if value <= 0xFFFF_FFFF else None


def _port(text: str, spec: str) -> int:
    value = _number(text)
    if value is None:
        raise AddressError(f"bad port {text!r} in {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    return value


def parse_address(spec: str) -> Address:
    """Parse one address; raise :class:`AddressError` naming the accepted forms."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise AddressError(f"malformed address {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind == "fc":
        path, sep, port = rest.rpartition(":")
        if not sep or not path:
            raise AddressError(f"malformed address {spec!r}; accepted forms: {ACCEPTED_FORMS}")
        return Address("fc", path=path, port=_port(port, spec))
    if kind == "vsock":
        cid_text, sep, port = rest.partition(":")
        if not sep:
            raise AddressError(f"malformed address {spec!r}; accepted forms: {ACCEPTED_FORMS}")
        if cid_text == "any":
            cid = VMADDR_CID_ANY
        elif (number := _number(cid_text)) is not None:
            cid = number
        else:
            raise AddressError(
                f"bad CID {cid_text!r} in {spec!r}; accepted forms: {ACCEPTED_FORMS}"
            )
        return Address("vsock", cid=cid, port=_port(port, spec))
    if kind in ("tcp", "udp"):
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
        else:
            host, sep, port = rest.rpartition(":")
            if ":" in host:
                sep = ""  # bare IPv6 must be bracketed
        if not sep or not host:
            raise AddressError(f"malformed address {spec!r}; accepted forms: {ACCEPTED_FORMS}")
        p = _port(port, spec)
        if p > 0xFFFF:
            raise AddressError(
                f"port {p} out of range 0-65535 in {spec!r}; accepted forms: {ACCEPTED_FORMS}"
            )
        return Address(kind, host=host, port=p)  # type: ignore[arg-type]
    raise AddressError(
        f"unknown address kind {kind!r} in {spec!r}; accepted forms: {ACCEPTED_FORMS}"
    )
