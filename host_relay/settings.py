"""Relay settings: one frozen dataclass, loaded from TOML and flags by ``timesyncd.config``."""

from __future__ import annotations

from dataclasses import dataclass, field

from host_relay.local_source import NAME as LOCAL_NAME
from timesyncd.addresses import AddressError, parse_address
from timesyncd.config import parse_file_mode
from timesyncd.framing import HEADER, MAX_PAYLOAD, relay_hello

#: Smallest frame that can carry an NTP request (header + upstream index + 48-byte packet).
MIN_FRAME_BYTES = HEADER.size + 1 + 48


@dataclass(frozen=True)
class RelaySettings:
    listen: tuple[str, ...] = field(
        default=("vsock:any:123",),
        metadata={"help": "Addresses to listen on for guests: vsock:CID:PORT (CID 'any'), "
                          "unix:PATH, fc:UDS_PATH:PORT (Firecracker hybrid vsock), tcp:HOST:PORT."},
    )
    upstreams: tuple[str, ...] = field(
        default=(),
        metadata={"flag": "--upstream",
                  "help": "Allowlisted NTP servers (udp:HOST:PORT), offered to guests by index "
                          "in this order. Empty: answer from the host clock at local_stratum."},
    )
    nts_ke_servers: tuple[str, ...] = field(
        default=(),
        metadata={"flag": "--nts-ke-server",
                  "help": "Allowlisted NTS-KE servers (tcp:HOST:PORT) guests may reach through "
                          "the relay as opaque byte streams (TLS stays end to end), offered by "
                          "index in HELLO under 'nts_ke'. List their NTP servers in upstreams."},
    )
    nts_ke_timeout_s: float = field(
        default=15.0,
        metadata={"help": "Longest lifetime of one NTS-KE stream (connect + TLS + response).",
                  "min": 0.1, "max": 600.0},
    )
    nts_ke_per_guest_per_minute: float = field(
        default=6.0,
        metadata={"help": "NTS-KE streams one guest may open per minute, across all its "
                          "connections (burst 8): each is a TLS handshake with a third-party "
                          "server from this host's address. Refusals: "
                          "timesync_relay_nts_ke_streams{event=\"guest_budget_exceeded\"}.",
                  "min": 0.1, "max": 6000.0},
    )
    local_stratum: int = field(
        default=10,
        metadata={"help": "Stratum announced when answering from the host clock (no upstreams), "
                          "like chrony's 'local stratum'.", "min": 1, "max": 15},
    )
    sched_priority: int = field(
        default=0,
        metadata={"help": "Run at SCHED_FIFO real-time priority N (1-99; 0: normal scheduling), "
                          "like chrony's sched_priority, so a busy host delays time stamps "
                          "less. Needs CAP_SYS_NICE (systemd: AmbientCapabilities=CAP_SYS_NICE "
                          "or LimitRTPRIO=N); refused: logged, runs at normal priority.",
                  "min": 0, "max": 99},
    )
    lock_memory: bool = field(
        default=False,
        metadata={"help": "Lock all the process's memory (mlockall, like chrony's lock_all) so "
                          "page faults stay off the time-stamping path. Needs CAP_IPC_LOCK or "
                          "systemd LimitMEMLOCK=infinity; refused: logged, runs unlocked."},
    )
    max_connections: int = field(
        default=4096,
        metadata={"help": "Guest connections held at once; further ones are closed at accept.",
                  "min": 1, "max": 1_000_000},
    )
    max_connections_per_guest: int = field(
        default=64,
        metadata={"help": "Connections one guest may hold at once (by vsock CID, TCP host, or "
                          "fc: socket, which serves one microVM; plain unix: clients are not "
                          "told apart), so one guest cannot take every slot; further ones are "
                          "closed at accept.",
                  "min": 1, "max": 1_000_000},
    )
    rate_limit: float = field(
        default=16.0,
        metadata={"help": "Sustained NTP requests per second per connection (token bucket); "
                          "excess requests get ERROR RATE_LIMITED.", "min": 0.01, "max": 1e6},
    )
    rate_burst: int = field(
        default=32,
        metadata={"help": "Token bucket size: requests a connection may send back to back.",
                  "min": 1, "max": 1_000_000},
    )
    max_pending: int = field(
        default=64,
        metadata={"help": "Requests in flight per connection; beyond it ERROR BUSY.",
                  "min": 1, "max": 65536},
    )
    idle_timeout_s: float = field(
        default=3600.0,
        metadata={"help": "Close a connection that sends nothing for this long (keep it above "
                          "the guests' longest poll interval).", "min": 0.01, "max": 86400.0 * 7},
    )
    hello_timeout_s: float = field(
        default=10.0,
        metadata={"help": "A new connection must send HELLO within this time.",
                  "min": 0.01, "max": 3600.0},
    )
    upstream_timeout_s: float = field(
        default=2.0,
        metadata={"help": "Wait this long for an upstream reply before ERROR UPSTREAM_TIMEOUT.",
                  "min": 0.01, "max": 60.0},
    )
    stale_request_s: float = field(
        default=5.0,
        metadata={"help": "A request read after a relay stall (SIGSTOP, frozen host) that may "
                          "have waited longer than this is dropped with ERROR "
                          "UPSTREAM_TIMEOUT and counted as stale, not forwarded: its guest "
                          "gave up on it (the guest's request_timeout_s; a guest may announce "
                          "its own in HELLO).", "min": 0.1, "max": 600.0},
    )
    max_frame_bytes: int = field(
        default=HEADER.size + MAX_PAYLOAD,
        metadata={"help": "Largest frame (header + payload) accepted from a guest; a larger one "
                          "closes the connection.",
                  "min": MIN_FRAME_BYTES, "max": HEADER.size + MAX_PAYLOAD},
    )
    socket_mode: str | None = field(
        default=None,
        metadata={"help": "Octal permissions for unix:/fc: listen sockets, e.g. '0660' "
                          "(unset: the process umask decides)."},
    )

    metrics: str | None = field(
        default=None,
        metadata={"help": "Serve Prometheus metrics at http://HOST:PORT/metrics and a JSON "
                          "guest/upstream status at /status (read by `timesync status --relay`): "
                          "tcp:HOST:PORT, e.g. tcp:127.0.0.1:9123. Unset: off."},
    )

    def validate(self) -> None:
        """Cross-field and syntax checks the metadata cannot express."""
        if not self.listen:
            raise ValueError("listen: no address given; add at least one, e.g. unix:/run/ts.sock")
        for spec in self.listen:
            try:
                addr = parse_address(spec)
            except AddressError as exc:
                raise ValueError(f"listen: {exc}") from exc
            if not addr.is_stream:
                raise ValueError(f"listen: {spec!r} is a datagram address; use vsock:, unix:, "
                                 "fc: or tcp:")
        for spec in self.upstreams:
            try:
                addr = parse_address(spec)
            except AddressError as exc:
                raise ValueError(f"upstreams: {exc}") from exc
            if addr.kind != "udp":
                raise ValueError(f"upstreams: {spec!r} is not udp:HOST:PORT; NTP upstreams are UDP")
        for spec in self.nts_ke_servers:
            try:
                addr = parse_address(spec)
            except AddressError as exc:
                raise ValueError(f"nts_ke_servers: {exc}") from exc
            if addr.kind != "tcp":
                raise ValueError(f"nts_ke_servers: {spec!r} is not tcp:HOST:PORT; NTS-KE runs "
                                 "over TCP (port 4460 by default)")
        if len(self.nts_ke_servers) > 256 or len(set(self.nts_ke_servers)) != len(
                self.nts_ke_servers):
            raise ValueError("nts_ke_servers: at most 256, each listed once")
        if len(self.upstreams) > 256:
            raise ValueError("upstreams: at most 256 (the frame's upstream index is one byte)")
        if len(set(self.upstreams)) != len(self.upstreams):
            raise ValueError("upstreams: listed twice; remove the duplicate")
        relay_hello([str(parse_address(u)) for u in self.upstreams] or [LOCAL_NAME],
                    [str(parse_address(k)) for k in self.nts_ke_servers])  # fits one frame
        if self.metrics is not None:
            try:
                maddr = parse_address(self.metrics)
            except AddressError as exc:
                raise ValueError(f"metrics: {exc}") from exc
            if maddr.kind != "tcp":
                raise ValueError(f"metrics: {self.metrics!r} is not tcp:HOST:PORT; Prometheus "
                                 "scrapes over TCP, e.g. tcp:127.0.0.1:9123")
        if self.socket_mode is not None:
            parse_file_mode("socket_mode", self.socket_mode)

    @property
    def socket_mode_bits(self) -> int | None:
        return None if self.socket_mode is None else parse_file_mode("socket_mode",
                                                                      self.socket_mode)
