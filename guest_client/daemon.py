"""``timesync guest``: the asyncio driver of the sans-IO :class:`GuestController`.

The daemon owns all I/O and the clock: it wakes the controller at the times it asks for,
carries its requests to the relay or to plain UDP servers, stamps send and receive times on
the disciplined clock as close to the socket as asyncio allows (relay send: right after the
write returns; receive: in the transport's ``data_received``/``datagram_received``), and
applies the controller's clock actions immediately and in order. Everything it decides itself
is transport: which socket a source name maps to, reconnecting, and reporting errors back as
events.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from guest_client.actions import Action, SendRequest, SetFrequency, SetKernelStatus, StepClock
from guest_client.clockbound_refresh import (
    CLOCKBOUND_REFRESH_S,
    CLOCKBOUND_VOID_AFTER,
    publish,
    refresh,
)
from guest_client.clockbound_writer import ClockBoundWriter, SegmentPublisher
from guest_client.clocks import SoftwareClock, SystemClock
from guest_client.control_server import ControlServer
from guest_client.controller import GuestController, SourceConfig
from guest_client.disruption import RESTORE_DETECTED
from guest_client.forward_ntp import NtpForwarder
from guest_client.freq_file import StartFrequency
from guest_client.freq_keeper import FrequencyKeeper
from guest_client.health import HealthReporter
from guest_client.nts_manager import NtsManager
from guest_client.nts_source import parse_nts_server
from guest_client.relay_link import RelayFailure, RelayLink, RelayReply, Upstream
from guest_client.settings import GuestSettings
from guest_client.state_log import StateLog
from guest_client.status_build import build_status
from guest_client.status_server import StatusServer
from guest_client.timer_driver import drive_timers
from guest_client.udp_source import UdpSource
from guest_client.vmclock_watch import Disruption, VmClockMonitor, open_monitor, reset_sessions
from timesyncd.addresses import parse_address
from timesyncd.aio import cancel_task
from timesyncd.clock import Clock
from timesyncd.config import parse_file_mode
from timesyncd.logs import decade
from timesyncd.ntptime import ntp_to_unix_ns
from timesyncd.status_report import StatusReport

log = logging.getLogger(__name__)

_NS = 1_000_000_000
CAP_SYS_TIME = 25


def make_clock(settings: GuestSettings) -> Clock:
    """The clock ``settings.clock`` names; refuses early if the system clock is not writable."""
    if settings.clock == "software":
        return SoftwareClock(settings.software_freq_ppm, settings.software_offset_s)
    if settings.clock == "system":
        if not _has_cap_sys_time():
            raise PermissionError(
                "clock = system needs CAP_SYS_TIME to adjust the system clock; run as root, "
                "grant the capability, or use --clock software")
        return SystemClock()
    raise ValueError("clock: not set; choose --clock system or --clock software")


def _has_cap_sys_time() -> bool:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_TIME & 1)
    except (OSError, ValueError):
        pass
    return True  # cannot tell: let clock_adjtime report EPERM


@dataclass(slots=True)
class _RelayRoute:
    upstream: int
    last_request: int | None = None


class GuestDaemon:
    """Drive one :class:`GuestController` against ``clock`` with the sources in ``settings``."""

    def __init__(
        self, settings: GuestSettings, clock: Clock, *, rng: random.Random | None = None,
        controller: GuestController | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # request cookies must be unpredictable to off-path attackers: OS randomness by default
        self._rng = rng if rng is not None else random.SystemRandom()
        self._udp: dict[str, UdpSource] = {}
        udp_names = [str(parse_address(s)) for s in settings.servers]
        self._trust = settings.trust_overrides()
        self.floor = settings.floor()
        #: the frequency correction the clock starts from (None with an injected controller)
        self.start_frequency: StartFrequency | None = None
        self.counters: Counter[str] = Counter()
        self.frequency = FrequencyKeeper(settings, clock, self.counters)
        if controller is None:
            self.start_frequency = sf = self.frequency.decide_start()
            controller = GuestController(
                settings.discipline_config(), self._rng,
                [SourceConfig(n, self._trust.get(n, "host")) for n in udp_names],
                initial_frequency_ppm=sf.ppm, initial_frequency_sd_ppm=sf.sd_ppm)
        self.controller = controller
        self.nts = NtsManager(
            [parse_nts_server(spec) for spec in settings.nts_servers],
            cafile=settings.nts_ca_file, clock=clock,
            is_synchronised=lambda: self.controller.state == "synchronised",
            on_reply=self._on_nts_reply, on_error=self._source_error,
            on_sent=self.controller.on_sent, ke_timeout_s=settings.nts_ke_timeout_s,
            floor=self.floor,
            on_ready=self._nts_ready,
        )
        for nts_name in self.nts.sources:
            self.controller.add_source(self._nts_config(nts_name), clock.now_ns())
        self._udp_names = udp_names
        self._relay_routes: dict[str, _RelayRoute] = {}
        self._relay_prefix = ""
        self.link: RelayLink | None = None
        self.status_server: StatusServer | None = None
        self.control_server: ControlServer | None = None
        self.forwarder: NtpForwarder | None = None
        self.health: HealthReporter | None = None  # reports to the relay (observability)
        self.clockbound: SegmentPublisher | None = None  # --clockbound-shm
        self._clockbound_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self.fatal: BaseException | None = None
        self._state_log = StateLog()
        self._running = False
        self._clock_touched = False  # start() wrote the clock: stop() must restore it
        self._freq_task: asyncio.Task[None] | None = None
        self.vmclock: VmClockMonitor | None = None  # --vmclock (guest_client.vmclock_watch)
        self._disruptions_seen = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        try:
            for spec, name in zip(s.servers, self._udp_names, strict=True):
                src = UdpSource(
                    spec, clock_ns=self.clock.now_ns,
                    on_reply=functools.partial(self._on_udp_reply, name),
                    on_error=functools.partial(self._source_error, name),
                )
                await src.start()
                self._udp[src.name] = src
            if s.relay:
                relay_addr = str(parse_address(s.relay))
                self._relay_prefix = f"relay:{relay_addr}#"
                self.link = RelayLink(
                    relay_addr, s.guest_name, rx_clock=self.clock.now_ns,
                    on_up=self._relay_up, on_down=self._relay_down,
                    reconnect_min_s=s.reconnect_min_s, reconnect_max_s=s.reconnect_max_s,
                    request_timeout_s=s.request_timeout_s, rng=random.Random(self._rng.random()),
                )
                self.nts.attach(self.link)
            if s.status_socket:
                mode = parse_file_mode("status_socket_mode", s.status_socket_mode)
                self.status_server = StatusServer(s.status_socket, self.status, mode=mode)
                await self.status_server.start()
            if s.control_socket:
                self.control_server = ControlServer(s.control_socket, self.makestep)
                await self.control_server.start()
            if s.forward_ntp and self.link is not None:
                self.forwarder = NtpForwarder(s.forward_ntp, self.link, s.forward_ntp_max_pending,
                                              s.forward_ntp_rate_limit)
                await self.forwarder.start()
            if s.clockbound_shm:  # refuses an unsafe file or a second writer, naming it
                self.clockbound = SegmentPublisher(ClockBoundWriter(
                    s.clockbound_shm, CLOCKBOUND_VOID_AFTER * CLOCKBOUND_REFRESH_S))
            self.vmclock = open_monitor(s.vmclock, s.vmclock_testing_file,
                                        s.vmclock_min_reset_interval_s, self._disrupted)
        except BaseException:
            await self.stop()
            raise
        self._running = True
        self._clock_touched = True
        first: list[Action] = []
        sf = self.start_frequency
        if sf is not None:
            log.info("starting from a frequency correction of %+.3f ppm: %s", sf.ppm, sf.reason)
            if sf.set_kernel:
                first.append(SetFrequency(sf.ppm))
        self._apply([*first, *self.controller.start(self.clock.now_ns())])
        for name in self.nts.sources:  # polled once NTS-KE gave keys (_nts_ready)
            self.controller.park(name)
        if self.fatal is not None:
            await self.stop()
            raise self.fatal
        if self.link is not None:
            await self.link.start(lambda exc: self._fail(exc, "relay link failed"))
            if s.health_interval_s > 0:
                link = self.link
                self.health = HealthReporter(link.send_frame, self.status_report,
                                             s.health_interval_s)
                await self.health.start()
        if self.vmclock is not None:
            await self.vmclock.start()
        self._timer_task = asyncio.create_task(self._timer_loop(), name="guest-timer")
        if s.freq_file:
            self._freq_task = asyncio.create_task(self.frequency.loop(
                s.freq_file, self.controller.base_frequency_ppm,
                lambda: self.controller.state == "synchronised"), name="guest-freq-file")
        if self.clockbound is not None:
            self._clockbound_task = asyncio.create_task(
                refresh(self._publish_bound, self.counters), name="clockbound")
        sources = list(self._udp)
        if s.relay and s.relay_plain_sources:
            sources.append(f"every upstream of relay {s.relay}")
        sources += [f"nts:{spec}" for spec in s.nts_servers]
        log.info("guest daemon started: clock %s; sources: %s; status socket %s", s.clock,
                 ", ".join(sources), s.status_socket or "off",
                 extra={"event": "guest_started"})

    async def stop(self) -> None:
        """Stop polling, put the clock back on its base frequency (no slew left behind), keep
        the frequency file, and close every socket. Safe to call more than once."""
        self._running = False
        if self.vmclock is not None:
            await self.vmclock.stop()
            self.vmclock = None
        if self._timer_task is not None:
            await cancel_task(self._timer_task)
            self._timer_task = None
        if self._freq_task is not None:
            await cancel_task(self._freq_task)
            self._freq_task = None
        if self._clock_touched:
            self._clock_touched = False
            self.frequency.restore(*self.controller.base_frequency_ppm())
        if self.forwarder is not None:
            self.forwarder.close()
        if self.health is not None:
            await self.health.stop()
        await self.nts.stop()
        if self.link is not None:
            await self.link.stop()
        for src in self._udp.values():
            src.close()
        if self.status_server is not None:
            await self.status_server.stop()
        if self.control_server is not None:
            await self.control_server.stop()
        if self._clockbound_task is not None:
            await cancel_task(self._clockbound_task)
            self._clockbound_task = None
        if self.clockbound is not None:  # writes UNKNOWN: nobody keeps the bound true now
            await asyncio.to_thread(self.clockbound.close)
            self.clockbound = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Start, run until ``stop`` is set (or a fatal clock error), then stop."""
        await self.start()
        try:
            waiters = [asyncio.create_task(self._failed.wait())]
            if stop is not None:
                waiters.append(asyncio.create_task(stop.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        finally:
            await self.stop()
        if self.fatal is not None:
            raise self.fatal

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``timesync status --json`` object (a :class:`StatusReport`, JSON form)."""
        return self.status_report().to_json()

    def status_report(self) -> StatusReport:
        return build_status(
            self.controller, self.clock.now_ns(), clock=self.settings.clock or "", floor=self.floor,
            true_offset_ns=self.clock.true_offset_ns(), link=self.link,
            forwarder=self.forwarder, clockbound=self.clockbound,
            vmclock=self.vmclock.status() if self.vmclock is not None else None,
            nts=self.nts.status(),
            start_frequency=self.start_frequency, daemon_errors=self.counters)

    def makestep(self) -> dict[str, Any]:
        """Step now, as an operator accepted (the control socket's ``makestep``)."""
        if not self._running:
            return {"error": "not_running: the daemon is stopping"}
        before = self.controller.steps
        actions, decision = self.controller.make_step(self.clock.now_ns())
        self._apply(actions)
        stepped = self.controller.steps > before and self.fatal is None
        return {"stepped": stepped, "offset_s": -decision.size_s if stepped else 0.0,
                "reason": decision.reason}

    # --- controller events ---------------------------------------------------------------

    def _disrupted(self, found: Disruption) -> None:
        """VMClock says the clock (or, by its generation, the whole VM) was disrupted."""
        if not self._running:
            return
        if found.clone:
            self._reset_sessions(found.cause)
        self._apply(self.controller.on_disruption(self.clock.now_ns(), found.cause))

    def _reset_sessions(self, cause: str) -> None:
        reset_sessions(self.nts, self.link, cause)
        for name in self.nts.sources:  # polled again once NTS-KE gave keys (_nts_ready)
            self.controller.park(name)

    async def _timer_loop(self) -> None:
        """Drive the controller's timers. A bug that escapes here must not leave a daemon that
        looks alive but no longer polls: it is fatal, and the process exits non-zero (so a
        supervisor restarts it) instead of drifting silently."""
        try:
            await drive_timers(self.controller, self.clock.now_ns, self._apply, self._wake,
                               self.counters, lambda: self._running)
        except Exception as exc:
            log.exception("guest timer loop failed, stopping")
            self._fail(exc, "internal error")

    def _relay_up(self, upstreams: list[Upstream]) -> None:
        now = self.clock.now_ns()
        if self.health is not None:
            self.health.link_up()
        wanted = {self._relay_prefix + u.name: u.index for u in upstreams
                  if self.settings.relay_plain_sources}
        for name in [n for n in self._relay_routes if n not in wanted]:
            del self._relay_routes[name]
            self.controller.remove_source(name)
            log.info("source %s removed (no longer offered by the relay)", name)
        for name, index in wanted.items():
            self._relay_routes[name] = _RelayRoute(index)
            # for a known source this re-arms it (a burst after reconnecting), keeping samples
            self._apply(self.controller.add_source(SourceConfig(
                name, self._trust.get(name, "host"), self.settings.relay_poll_exchanges), now))
        for nts_name, nts_src in self.nts.sources.items():  # re-arm (a burst) after reconnect
            if nts_src.ready:  # the others are armed by _nts_ready once NTS-KE is done
                self._apply(self.controller.add_source(self._nts_config(nts_name), now))
        self.nts.on_relay_up()

    def _nts_ready(self, name: str) -> None:
        """NTS-KE gave keys: poll now (a burst), not before, so a clean start counts nothing."""
        if self._running:
            self._apply(self.controller.add_source(self._nts_config(name), self.clock.now_ns()))

    def _nts_config(self, name: str) -> SourceConfig:
        return SourceConfig(name, self._trust.get(name, "authenticated"))

    def _on_nts_reply(self, source: str, data: bytes, rx_ns: int, r_in: int, r_out: int) -> None:
        """An NTS reply that verified: only these reach the controller for an NTS source."""
        if self._running:
            self._apply(self.controller.on_reply(source, data, rx_ns, r_in, r_out))

    def _relay_down(self, reason: str) -> None:
        log.warning("relay connection lost (%s): its sources wait until it is back", reason)
        self.nts.on_relay_down()
        # only the sources the link carried: direct UDP servers keep being polled
        carried = [*self._relay_routes, *self.nts.sources]
        self._apply(self.controller.on_connection_lost(self.clock.now_ns(), sources=carried))

    def _on_relay_result(self, source: str, result: RelayReply | RelayFailure) -> None:
        if not self._running:
            return
        if isinstance(result, RelayReply):
            route = self._relay_routes.get(source)
            if route is None or self._before_floor(source, result.packet):
                return
            self._apply(self.controller.on_reply(
                source, result.packet, result.rx_ns, result.residence_in_ns,
                result.residence_out_ns))
        elif result.reason != "connection_lost":  # that one is reported once, via _relay_down
            self._source_error(source, result.reason)

    def _on_udp_reply(self, source: str, data: bytes, rx_ns: int) -> None:
        if self._running and not self._before_floor(source, data):
            self._apply(self.controller.on_reply(source, data, rx_ns))

    def _before_floor(self, source: str, packet: bytes) -> bool:
        """A plain reply whose server time is before the time floor is refused here, like an
        NTS one in the NTS manager: no source may take the clock back before it. (KoD replies,
        stratum 0, carry no time: the controller handles them.)"""
        if len(packet) < 48 or packet[1] == 0:
            return False
        server_ns = ntp_to_unix_ns(int.from_bytes(packet[40:48], "big"), self.floor.floor_ns)
        if self.floor.allows(server_ns):
            return False
        self.counters["before_time_floor"] += 1
        if decade(self.counters["before_time_floor"]):
            log.warning("source %s: reply time is before the time floor %s (%s): refused (%d "
                        "so far)", source, f"{self.floor.datetime:%Y-%m-%d}", self.floor.source,
                        self.counters["before_time_floor"])
        self._source_error(source, "before_time_floor")
        return True

    def _source_error(self, source: str, reason: str) -> None:
        if self._running:
            self._apply(self.controller.on_source_error(source, reason, self.clock.now_ns()))

    # --- actions -------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        if self.fatal is not None:  # stopped on a clock error: no more sends or clock writes
            return
        for action in actions:
            if isinstance(action, SendRequest):
                self._send(action)
                continue
            try:
                if isinstance(action, SetFrequency):
                    self.clock.set_frequency(action.ppm)
                    applied = getattr(self.controller, "frequency_applied", None)  # (doubles)
                    if applied is not None:  # when, not when decided: the model must know
                        applied(self.clock.last_change_ns or self.clock.now_ns())
                elif isinstance(action, StepClock):
                    self.clock.step(action.offset_ns)
                    log.info("stepped the clock by %+.9f s", action.offset_ns / _NS)
                elif isinstance(action, SetKernelStatus):
                    self.clock.set_kernel_status(action.status)
            except OSError as exc:
                self._fail(exc)
                return
        self._wake.set()
        disruption = getattr(self.controller, "disruption", None)  # (scripted test doubles)
        if disruption is not None and disruption.count != self._disruptions_seen:
            self._disruptions_seen = disruption.count
            if disruption.cause == RESTORE_DETECTED:  # no VMClock told us: clone-safe anyway
                self._reset_sessions(RESTORE_DETECTED)
        if len(actions) > sum(isinstance(a, SendRequest) for a in actions):
            self._publish_bound()  # a clock update: the segment must say so now
        self._state_log.log_changes(self.controller, self.clock.now_ns)

    def _send(self, action: SendRequest) -> None:
        name = action.source
        if self.nts.owns(name):
            self.nts.send(name, action.data)
            return
        udp = self._udp.get(name)
        if udp is not None:
            t1 = udp.send(action.data)
            if t1 is None:
                self._source_error(name, "send_failed")
            else:
                self.controller.on_sent(name, t1)
            return
        route = self._relay_routes.get(name)
        if route is None or self.link is None:
            self.counters["unknown_source"] += 1
            return
        if route.last_request is not None:
            self.link.cancel(route.last_request)  # superseded: the controller forgot it too
        rid = self.link.send(route.upstream, action.data,
                             functools.partial(self._on_relay_result, name))
        route.last_request = rid
        if rid is None:
            self._source_error(name, self.link.last_refusal or "relay_not_connected")
        else:  # t1 from just before the write: never later than the bytes left (issue 12)
            self.controller.on_sent(name, self.link.last_tx_ns or self.clock.now_ns())

    def _fail(self, exc: Exception, what: str = "cannot adjust the clock") -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("%s, stopping: %s", what, exc)
        self._running = False
        self._failed.set()
        self._wake.set()  # let the timer loop see it now, not after its sleep

    # --- ClockBound segment ---------------------------------------------------------------

    def _publish_bound(self) -> None:
        if self.clockbound is not None and self.fatal is None:
            marker = self.vmclock.watch.marker if self.vmclock is not None else None
            publish(self.clockbound, self.controller, self.clock.now_ns, marker)

    async def wait_failed(self) -> BaseException:
        """Return the fatal error once the daemon stopped working on its own (a clock write
        failed): :func:`timesyncd.cli.runtime.serve_until_signal` ends the process on it."""
        await self._failed.wait()
        assert self.fatal is not None
        return self.fatal
