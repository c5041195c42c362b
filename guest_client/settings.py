"""Settings of ``timesync guest``: flat, typed, with help and ranges the config loader enforces.

Discipline fields mirror ``timesyncd.discipline.DisciplineConfig`` (name, default, help and
range come from there), so :meth:`GuestSettings.discipline_config` hands them over whole.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from guest_client.nts_source import check_ca_file, parse_nts_server
from timesyncd.addresses import AddressError, parse_address
from timesyncd.config import parse_file_mode
from timesyncd.discipline import DisciplineConfig
from timesyncd.time_floor import TimeFloor

DEFAULT_STATUS_SOCKET = "/run/timesync/guest.sock"
_DISCIPLINE = {f.name: f for f in dataclasses.fields(DisciplineConfig)}


def _mirror(name: str) -> Any:
    """A settings field with DisciplineConfig's default and metadata: one source of truth."""
    f = _DISCIPLINE[name]
    return field(default=f.default, metadata=f.metadata)



@dataclass(frozen=True)
class GuestSettings:
    relay: str | None = field(default=None, metadata={
        "help": "Relay to reach NTP through: vsock:CID:PORT, unix:PATH, fc:UDS_PATH:PORT or "
                "tcp:HOST:PORT; each of its upstreams becomes a source."})
    servers: tuple[str, ...] = field(default=(), metadata={
        "flag": "--server",
        "help": "Plain NTP servers used directly as sources, udp:HOST:PORT (repeatable)."})
    clock: str | None = field(default=None, metadata={
        "choices": ("system", "software"),
        "help": "Clock to discipline: 'system' adjusts the machine's clock (CAP_SYS_TIME), "
                "'software' a user-space clock for demos and tests. No default: writing the "
                "real clock must be an explicit choice."})
    software_freq_ppm: float = field(default=0.0, metadata={
        "min": -50_000.0, "max": 50_000.0,
        "help": "Software clock: native rate error, ppm (positive runs fast)."})
    software_offset_s: float = field(default=0.0, metadata={
        "flag": "--software-offset", "min": -1e6, "max": 1e6,
        "help": "Software clock: initial offset from the machine clock, seconds."})
    status_socket: str = field(default=DEFAULT_STATUS_SOCKET, metadata={
        "help": "Unix socket path answering `timesync status` (empty to disable)."})
    status_socket_mode: str = field(default="0660", metadata={
        "help": "Permissions of the status socket, octal (0666 lets any local user read it)."})
    control_socket: str = field(default="", metadata={
        "help": "Unix socket path for `timesync makestep` (an operator accepting a step), "
                "created mode 0600, only root or the daemon's user may use it; every use is "
                "logged. Empty (default): off."})
    forward_ntp: str | None = field(default=None, metadata={
        "help": "Serve plain NTP at udp:HOST:PORT inside the guest, forwarding each request "
                "over the relay's first upstream (for unmodified NTP clients)."})
    forward_ntp_max_pending: int = field(default=256, metadata={
        "min": 1, "max": 65536,
        "help": "Forwarder: most requests awaiting a reply at once; more are dropped."})
    forward_ntp_rate_limit: float = field(default=8.0, metadata={
        "min": 0.01, "max": 1e6,
        "help": "Forwarder: requests per second passed to the relay (burst twice that); more "
                "are dropped and counted. Keep it under the relay's rate_limit (16 by default) "
                "less this daemon's own polling: a guest far over it is disconnected."})
    clockbound_shm: str = field(default="", metadata={
        "help": "Publish the error bound as a ClockBound shared-memory segment (protocol 2) "
                "at this path, e.g. /var/run/clockbound/shm0 (ClockBound's default, which its "
                "clients read unchanged); empty: off. See docs/CLOCKBOUND.md."})
    vmclock: str = field(default="/dev/vmclock0", metadata={
        "help": "VMClock device (Linux 6.13+): watch its disruption marker and VM generation "
                "counter (snapshot restore, clone, migration); used when present, must be a "
                "character device; empty: off. See docs/DEPLOYMENT.md."})
    vmclock_testing_file: bool = field(default=False, metadata={
        "help": "Accept a regular file as the VMClock device (tests with a fake page only)."})
    vmclock_min_reset_interval_s: float = field(default=60.0, metadata={
        "min": 0.0, "max": 86400.0,
        "help": "Act on VMClock marker or generation changes at most once per this many "
                "seconds (later changes are counted and acted on once after it): a host "
                "cannot keep the guest disrupted or force NTS-KE in a loop."})
    name: str = field(default="", metadata={
        "help": "Guest name announced to the relay (default: the host name)."})
    # --- NTS (see docs/SECURITY.md) ---
    nts_servers: tuple[str, ...] = field(default=(), metadata={
        "flag": "--nts-server",
        "help": "NTS-KE servers reached through the relay, each an authenticated source: "
                "NAME[:PORT] (certificate checked for NAME, relay endpoint tcp:NAME:PORT) or "
                "NAME@HOST[:PORT] (relay endpoint tcp:HOST:PORT); PORT defaults to 4460. "
                "The relay must list the endpoint in nts_ke_servers and its NTP server in "
                "upstreams."})
    nts_ca_file: str | None = field(default=None, metadata={
        "help": "PEM bundle of CAs trusted for NTS-KE certificates (unset: the system store; "
                "a private bundle stops a host with any public certificate from posing as "
                "your server)."})
    nts_ke_timeout_s: float = field(default=10.0, metadata={
        "min": 0.1, "max": 600.0, "help": "Give up on one NTS-KE exchange after this long."})
    time_floor: str | None = field(default=None, metadata={
        "help": "Earliest acceptable time, YYYY-MM-DD or an ISO 8601 date-time (UTC unless a "
                "zone is given), e.g. the image's build date. Raises the built-in floor (this "
                "release's date): replies dated before it and certificates that expired before "
                "it are refused (docs/SECURITY.md)."})
    relay_plain_sources: bool = field(default=True, metadata={
        "help": "Also use every relay upstream as a plain NTP source (trust 'host'). With "
                "authenticated sources configured, plain ones are only used within the bounds "
                "the authenticated ones allow."})
    relay_poll_exchanges: int = field(default=3, metadata={
        "min": 1, "max": 8,
        "help": "NTP exchanges per poll through the relay, sent back to back; the one of least "
                "path delay is used. The first pays cold process wake-ups that no time stamp "
                "sees and that are not symmetric (idle: ~70 us of offset error); the later "
                "ones find relay and guest awake (docs/BENCHMARKS.md, 'Warm exchanges')."})
    source_trust: tuple[str, ...] = field(default=(), metadata={
        "help": "Per-source trust overrides, SOURCE=authenticated or SOURCE=host, SOURCE a name "
                "as `timesync status` shows it (udp:HOST:PORT, nts:SPEC, relay:ADDR#UPSTREAM). "
                "Default: NTS sources 'authenticated', all others 'host'."})
    # --- frequency file (see docs/DEPLOYMENT.md: only where the guest has persistent storage) ---
    freq_file: str | None = field(default=None, metadata={
        "help": "Keep the learned frequency in this file (like chrony's driftfile) so a restart "
                "starts from it; written atomically every freq_file_interval_s and at stop. "
                "Missing, corrupt or stale files are logged and ignored. Useful only on "
                "persistent storage (Firecracker root disk; not a Nitro enclave). Default off."})
    freq_file_interval_s: float = field(default=3600.0, metadata={
        "min": 1.0, "max": 604_800.0,
        "help": "Write the frequency file this often while synchronised (and at stop)."})
    freq_file_max_age_s: float = field(default=604_800.0, metadata={
        "min": 60.0, "max": 31_536_000.0,
        "help": "Ignore a frequency file older than this (the oscillator may have changed, "
                "e.g. the VM moved to another host)."})
    # --- discipline: mirrored from DisciplineConfig (same names, defaults, help, ranges) ---
    minpoll: int = _mirror("minpoll")
    maxpoll: int = _mirror("maxpoll")
    burst: int = _mirror("burst")
    step_threshold_s: float = _mirror("step_threshold_s")
    step_limit: int = _mirror("step_limit")
    max_slew_ppm: float = _mirror("max_slew_ppm")
    slew_time_s: float = _mirror("slew_time_s")
    max_root_distance_s: float = _mirror("max_root_distance_s")
    max_samples: int = _mirror("max_samples")
    max_delay_dev_ratio: float = _mirror("max_delay_dev_ratio")
    jump_confirm_samples: int = _mirror("jump_confirm_samples")
    outage_s: float = _mirror("outage_s")
    holdover_polls: int = _mirror("holdover_polls")
    holdover_drift_ppm: float = _mirror("holdover_drift_ppm")
    max_error_s: float = _mirror("max_error_s")
    max_clock_error_ppm: float = _mirror("max_clock_error_ppm")
    sync_max_correction_s: float = _mirror("sync_max_correction_s")
    leap_mode: str = _mirror("leap_mode")
    # --- scheduling (docs/DEPLOYMENT.md: the systemd settings that grant them) ---
    sched_priority: int = field(default=0, metadata={
        "min": 0, "max": 99,
        "help": "Run at SCHED_FIFO real-time priority N (1-99; 0: normal scheduling), like "
                "chrony's sched_priority, so a busy host delays time stamps less. Needs "
                "CAP_SYS_NICE (systemd: AmbientCapabilities=CAP_SYS_NICE or LimitRTPRIO=N); "
                "refused: logged, runs at normal priority."})
    lock_memory: bool = field(default=False, metadata={
        "help": "Lock all the process's memory (mlockall, like chrony's lock_all) so page "
                "faults stay off the time-stamping path. Needs CAP_IPC_LOCK or systemd "
                "LimitMEMLOCK=infinity; refused: logged, runs unlocked."})
    # --- daemon ---
    reconnect_min_s: float = field(default=0.5, metadata={
        "min": 0.01, "max": 3600.0, "help": "First delay before reconnecting to the relay."})
    reconnect_max_s: float = field(default=30.0, metadata={
        "min": 0.01, "max": 3600.0, "help": "Cap of the exponential reconnect backoff."})
    request_timeout_s: float = field(default=5.0, metadata={
        "min": 0.05, "max": 600.0,
        "help": "A request unanswered this long is reported to the controller as a timeout."})
    health_interval_s: float = field(default=10.0, metadata={
        "min": 0.0, "max": 3600.0,
        "help": "Send the relay a health report (state, offset, frequency, error bound, "
                "rejections) this often, and on state changes (at most 1/s); the host "
                "exports it as metrics. 0 turns reports off."})

    def validate(self) -> None:
        if self.clock is None:
            raise ValueError(
                "clock: not set; writing the real clock is an explicit choice: use "
                "--clock system (adjusts this machine's time, needs CAP_SYS_TIME) or "
                "--clock software (a user-space clock for demos and tests)")
        if not self.relay and not self.servers:
            raise ValueError("relay/servers: no time source; give --relay ADDRESS and/or "
                             "--server udp:HOST:PORT")
        if self.relay:
            addr = _address("relay", self.relay)
            if not addr.is_stream:
                raise ValueError(f"relay: {self.relay!r} is a UDP address; the relay is reached "
                                 "over a stream: vsock:, unix:, fc: or tcp:")
        for server in self.servers:
            if _address("servers", server).kind != "udp":
                raise ValueError(f"servers: {server!r} is not udp:HOST:PORT; relay addresses "
                                 "go in --relay")
        if self.forward_ntp:
            if _address("forward_ntp", self.forward_ntp).kind != "udp":
                raise ValueError(f"forward_ntp: {self.forward_ntp!r}; use udp:HOST:PORT")
            if not self.relay:
                raise ValueError("forward_ntp: needs --relay (requests are forwarded over it)")
            if self.clock == "system":
                raise ValueError(
                    "forward_ntp: refused with clock = system: the NTP client you forward for "
                    "would discipline the same clock as this daemon and the two would fight; "
                    "use --clock software or drop --forward-ntp")
        self._validate_nts()
        if self.minpoll > self.maxpoll:
            raise ValueError(f"minpoll: {self.minpoll} is above maxpoll {self.maxpoll}; "
                             "lower minpoll or raise maxpoll")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s: above reconnect_max_s; swap or fix them")
        parse_file_mode("status_socket_mode", self.status_socket_mode)
        if self.freq_file is not None and os.path.isdir(self.freq_file):
            raise ValueError(f"freq_file: {self.freq_file!r} is a directory; give a file path "
                             "on persistent storage, e.g. /var/lib/timesync/freq")
        self.discipline_config()  # its own cross-field checks, e.g. minpoll <= maxpoll

    def _validate_nts(self) -> None:
        specs = []
        for spec in self.nts_servers:
            try:
                parsed = parse_nts_server(spec)
                specs.append((parsed.tls_name, parsed.ke_endpoint))
            except ValueError as exc:
                raise ValueError(f"nts_servers: {exc}") from exc
        if len(set(specs)) != len(specs):
            raise ValueError("nts_servers: listed twice; remove the duplicate")
        if self.nts_servers and not self.relay:
            raise ValueError("nts_servers: needs --relay (NTS-KE and NTP go through it)")
        if self.nts_ca_file is not None and not os.path.isfile(self.nts_ca_file):
            raise ValueError(f"nts_ca_file: {self.nts_ca_file!r} is not a readable file; give "
                             "the PEM bundle of the CAs that issue your NTS-KE certificates")
        if self.nts_ca_file is not None and self.nts_servers:  # unused otherwise: skip OpenSSL
            try:
                check_ca_file(self.nts_ca_file)
            except ValueError as exc:
                raise ValueError(f"nts_ca_file: {exc}; give the PEM bundle (one or more "
                                 "-----BEGIN CERTIFICATE----- blocks) of the CAs that issue "
                                 "your NTS-KE certificates") from None
        self.trust_overrides()
        if self.time_floor is not None:
            try:
                self.floor()
            except ValueError as exc:
                raise ValueError(f"time_floor: {exc}") from None

    def floor(self) -> TimeFloor:
        """The time floor: the release date, raised to ``time_floor`` if set and later."""
        return TimeFloor.build(self.time_floor)

    def trust_overrides(self) -> dict[str, str]:
        """``source_trust`` as a dict; ValueError for a malformed entry."""
        out: dict[str, str] = {}
        for entry in self.source_trust:
            name, sep, trust = entry.rpartition("=")
            if not sep or not name or trust not in ("authenticated", "host"):
                raise ValueError(f"source_trust: {entry!r}; use SOURCE=authenticated or "
                                 "SOURCE=host")
            out[name] = trust
        return out

    @property
    def guest_name(self) -> str:
        return self.name or socket.gethostname() or f"pid-{os.getpid()}"

    def discipline_config(self) -> DisciplineConfig:
        """The controller's configuration: our values of every DisciplineConfig field."""
        return DisciplineConfig(**{n: getattr(self, n) for n in _DISCIPLINE if hasattr(self, n)})


def _address(key: str, spec: str) -> Any:
    try:
        return parse_address(spec)
    except AddressError as exc:
        raise ValueError(f"{key}: {exc}") from exc
