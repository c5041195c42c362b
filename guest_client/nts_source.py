"""One NTS-protected time source in the guest: KE result -> cookies -> wrapped requests.

Sans-IO: the daemon's NTS manager runs NTS-KE (over a relay stream) and hands the result in;
this class maps the KE server's NTPv4 Server/Port records to an allowlisted relay upstream,
wraps the controller's plain requests with NTS fields and verifies replies before the
controller sees them. A reply that fails verification never reaches the controller: it is
counted by reason and reported as a source error, so it cannot move the clock.

Which relay endpoint serves which name is decided *here*, from the guest's own config, never
from the relay's HELLO alone: the host chooses nothing it could use to pick a server whose
certificate it controls.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from timesyncd.exchange import Rejection
from timesyncd.packet import NtpPacket, PacketError, decode

if TYPE_CHECKING:  # the NTS modules load cryptography and pyOpenSSL (~15 MiB): only when used
    from timesyncd.nts.ke_session import NtsKeResult
    from timesyncd.nts.ntp import NtsState, RandomBytes

DEFAULT_KE_PORT = 4460


@dataclass(frozen=True)
class NtsServerSpec:
    """``NAME[:PORT]`` or ``NAME@HOST[:PORT]``: verify the certificate for NAME, reach the
    KE server as the relay's ``tcp:HOST:PORT`` endpoint (HOST defaults to NAME)."""

    spec: str
    tls_name: str
    host: str
    port: int

    @property
    def source_name(self) -> str:
        return f"nts:{self.spec}"

    @property
    def ke_endpoint(self) -> str:
        """How the relay names this KE server in HELLO's ``nts_ke`` list."""
        return f"tcp:{_host(self.host)}:{self.port}"


def parse_nts_server(spec: str) -> NtsServerSpec:
    """Parse one ``nts_servers`` entry; raise ValueError naming the accepted forms."""
    forms = "NAME[:PORT] or NAME@HOST[:PORT], e.g. time.example.com:4460 or localhost@127.0.0.1"
    name, at, where = spec.partition("@")
    host_port = where if at else spec
    host, port = _split_host_port(host_port, forms, spec)
    if at:
        if not name or any(c.isspace() or c in "[]:/" for c in name):
            raise ValueError(f"bad TLS name in {spec!r}; use {forms}")
    else:
        name = host
    _check_tls_name(name, spec, forms)
    return NtsServerSpec(spec, name, host, port)


def _check_tls_name(name: str, spec: str, forms: str) -> None:
    """Refuse a name the KE session could not send as SNI (``str.encode("idna")``): caught
    here it is a config error naming the entry, at NTS-KE time only a failed exchange."""
    try:
        ipaddress.ip_address(name)
        return  # an IP address is matched as such, never sent as SNI
    except ValueError:
        pass
    try:
        name.encode("idna")
    except UnicodeError as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise ValueError(f"TLS name {name!r} in {spec!r} is not a valid host name ({cause}); "
                         f"labels between dots must be 1 to 63 characters; use {forms}") from None


def check_ca_file(path: str) -> None:
    """Load ``path`` as NTS-KE sessions will (pyOpenSSL); ValueError saying why it cannot be.

    A bundle OpenSSL cannot read would otherwise only fail each key exchange at run time.
    Imports pyOpenSSL (~15 MiB), so call it only when NTS sources are configured.
    """
    from OpenSSL import SSL

    try:
        SSL.Context(SSL.TLS_CLIENT_METHOD).load_verify_locations(path)
    except (SSL.Error, OSError) as exc:
        errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None
        why = "; ".join(str(e[-1]) for e in errors) if errors else str(exc)  # OpenSSL's reasons
        raise ValueError(f"{path!r} cannot be loaded as a PEM CA bundle ({why})") from None


def _split_host_port(text: str, forms: str, spec: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
        if not sep or port_text is None:
            raise ValueError(f"malformed {spec!r}; use {forms}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ValueError(f"IPv6 address in {spec!r} must be bracketed, e.g. [::1]:4460")
    else:
        host, port_text = text, ""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"malformed {spec!r}; use {forms}")
    if not port_text:
        return host, DEFAULT_KE_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 0xFFFF):
        raise ValueError(f"bad port in {spec!r}; use {forms}")
    return host, int(port_text)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def ntp_upstream_candidates(spec: NtsServerSpec, server: str, port: int) -> list[str]:
    """Relay upstream names that may carry NTP for a KE result naming ``server:port``.

    The records are authenticated (inside TLS) but the relay cannot read them, so its
    allowlist must name the NTP server too. A record naming the KE server itself (or no
    Server record: then ``server`` is our TLS name) also maps to the relay's HOST for it.
    """
    names = [f"udp:{_host(server)}:{port}"]
    if server.rstrip(".").lower() == spec.tls_name.rstrip(".").lower() and spec.host != server:
        names.append(f"udp:{_host(spec.host)}:{port}")
    return names


class NtsSource:
    """Keys, cookies and the NTP route of one NTS source; see the module doc."""

    def __init__(self, spec: NtsServerSpec, random_bytes: RandomBytes = os.urandom) -> None:
        self.spec = spec
        self._random = random_bytes
        self.state: NtsState | None = None
        self.upstream: int | None = None  # relay upstream index carrying our NTP
        self.ntp_server = ""  # "server:port" from the last KE
        self.validity_unchecked = False
        self.key_exchanges = 0
        self.note = "NTS-KE pending"
        self._candidates: list[str] = []  # relay upstream names our NTP server may have
        #: KE failures and rejected replies by reason
        self.counters: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return self.spec.source_name

    @property
    def ready(self) -> bool:
        return self.state is not None and self.upstream is not None and not self.state.needs_ke

    @property
    def needs_ke(self) -> bool:
        return self.state is None or self.state.needs_ke

    def on_ke_result(self, result: NtsKeResult, upstreams: dict[str, int]) -> bool:
        """Install a KE result; map its NTP server to one of ``upstreams`` (relay name ->
        index). False (with a clear :attr:`note`) if the relay does not allowlist it."""
        self.key_exchanges += 1
        self.validity_unchecked = result.validity_unchecked
        self.ntp_server = f"{_host(result.server)}:{result.port}"
        candidates = ntp_upstream_candidates(self.spec, result.server, result.port)
        self._candidates = candidates
        index = next((upstreams[c] for c in candidates if c in upstreams), None)
        if index is None:
            self.state = None
            self.upstream = None
            self.counters["ntp_server_not_allowlisted"] += 1
            self.note = (f"NTS-KE server sends NTP to {self.ntp_server}, which the relay does not "
                         f"allowlist; add {candidates[-1]} to the relay's upstreams")
            return False
        from timesyncd.nts.ntp import NtsState

        self.state = NtsState(result.c2s_key, result.s2c_key, result.cookies,
                              aead_id=result.aead_id)
        self.upstream = index
        self.note = "" if not result.validity_unchecked else (
            "certificate dates unchecked (clock not yet trusted); NTS-KE again once synchronised")
        return True

    def remap(self, upstreams: dict[str, int]) -> None:
        """The relay reconnected: its upstream indices may have changed. Keep the keys if our
        NTP server is still offered, else drop them (the next poll runs NTS-KE again)."""
        index = next((upstreams[c] for c in self._candidates if c in upstreams), None)
        if index is None and self.state is not None:
            self.state = None
            self.note = f"relay no longer offers {self._candidates[-1]}: NTS-KE again"
        self.upstream = index

    def discard(self, reason: str) -> None:
        """Forget keys and cookies (restore or clone): NTS-KE again before the next request."""
        if self.state is not None:
            self.counters["discarded_on_restore"] += 1
        self.state = None
        self.note = f"NTS keys and cookies discarded ({reason}): NTS-KE again"

    def on_ke_error(self, reason: str, detail: str) -> None:
        self.counters[f"ke_{reason}"] += 1
        self.note = f"NTS-KE failed: {reason}" + (f" ({detail})" if detail else "")

    def wrap(self, data: bytes) -> bytes | str:
        """The controller's plain request with NTS fields, or the reason it cannot be sent."""
        if self.state is None or self.upstream is None:
            return "nts_not_ready"
        from timesyncd.nts.ntp import NtsError  # loaded with the state

        try:
            header = decode(data)
            return self.state.request(replace(header, extensions=()), self._random)
        except NtsError as exc:
            return exc.reason
        except PacketError as exc:
            return f"malformed_request:{exc.reason}"

    def verify(self, data: bytes) -> NtpPacket | Rejection:
        """Authenticate a reply; count and return the rejection if it fails."""
        if self.state is None:
            self.counters["nts_unsolicited"] += 1
            return Rejection("nts_unsolicited", "no NTS keys")
        result = self.state.verify(data)
        if isinstance(result, Rejection):
            self.counters[result.reason] += 1
            if result.reason == "nts_nak":
                self.note = "server rejected our cookies (NTS NAK): NTS-KE again"
        return result

    def status(self) -> dict[str, Any]:
        return {
            "tls_name": self.spec.tls_name, "ke_endpoint": self.spec.ke_endpoint,
            "ntp_server": self.ntp_server, "ready": self.ready,
            "cookies": self.state.cookies if self.state is not None else 0,
            "key_exchanges": self.key_exchanges,
            "certificate_dates_checked": self.key_exchanges > 0 and not self.validity_unchecked,
            "errors": dict(self.counters),
        }
