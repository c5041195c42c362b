"""The guest's clock controller, sans-IO: events in, actions out (daemon and simulator share it).

All times passed in are readings of the clock being disciplined (Unix ns). The controller
never reads a clock: the driver applies the returned actions to its ``Clock`` at once, in
order, and reports replies with the clock reading at arrival. Inside, times are elapsed
seconds that a step does not move (:mod:`guest_client.timebase`); clock readings go out
in ``next_timer_ns``, actions and status.

Flow per reply: ``ClientExchange`` checks it -> step policy on a large jump (slew / step /
refuse, :mod:`guest_client.step_policy`) -> per-source ``SampleFilter`` -> regression fit and
trust bound (:mod:`guest_client.candidates`) -> ``select`` over sources -> slew plan -> state
from the error bound (:mod:`guest_client.error_bound`, :mod:`guest_client.sync_state`).
Samples are kept in the clock's uncorrected time scale (``CorrectionModel``), so slews and
steps never invalidate them. Step and jump handling live in :mod:`guest_client.stepping`,
the state keeping in :mod:`guest_client.state_keeping` (mixins sharing this class's state).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable

from guest_client.actions import (
    Action,
    ControllerStatus,
    SendRequest,
    SetFrequency,
    SetKernelStatus,
)
from guest_client.candidates import (
    bound_terms,
    first_update_ready,
    freq_uncertainty,
    gain,
    gather,
    trust_bound,
)
from guest_client.disruption import DisruptionState
from guest_client.error_bound import MAX_BOUND_S, BoundBasis, ErrorBound, compute, root_distance
from guest_client.source import Source, SourceConfig
from guest_client.state_keeping import StateKeeping
from guest_client.step_policy import Discontinuity, JumpState, StepAction, boot_evidence, decide
from guest_client.stepping import StepHandling
from guest_client.sync_state import StateEvent, StateMachine, SyncState
from guest_client.timebase import TimeBase
from guest_client.tracking import OffsetRms, Tracking, build_tracking
from timesyncd.clock import KernelStatus
from timesyncd.correction import CorrectionModel
from timesyncd.discipline import DisciplineConfig
from timesyncd.exchange import Rejection, Sample
from timesyncd.filter import FilteredSample
from timesyncd.fit import PRIOR_SLOPE_SD
from timesyncd.selection import select
from timesyncd.slew import slew_plan

log = logging.getLogger(__name__)

__all__ = ["GuestController", "SourceConfig"]

_NS = 1_000_000_000


class GuestController(StepHandling, StateKeeping):
    """Disciplines one clock from one or more NTP sources by slewing; see the module doc."""

    def __init__(self, config: DisciplineConfig, rng: random.Random,
                 sources: Iterable[SourceConfig] = (), *, initial_frequency_ppm: float = 0.0,
                 initial_frequency_sd_ppm: float | None = None) -> None:
        """``initial_frequency_ppm`` is the correction the clock already holds when the
        controller starts (from a frequency file, or kept from the kernel): the model must
        know it, or samples taken before the first update are read at the wrong rate."""
        self.config = config
        self._rng = rng
        self._sources: dict[str, Source] = {}
        self._tb = TimeBase()  # the one base of every time kept below
        self._model = CorrectionModel(0.0, initial_frequency_ppm * 1e-6)
        self._started = False
        self._sm = StateMachine()
        self.events: list[StateEvent] = []  # state transitions since the driver last drained
        self.updates = 0
        self.steps = 0
        self.refused_jumps = 0
        self.rejected: dict[str, int] = {}
        # native rate error of the uncorrected clock (fraction): the base correction is -slope
        self._slope = -initial_frequency_ppm * 1e-6
        self._slope_sd = (math.inf if initial_frequency_sd_ppm is None
                          else initial_frequency_sd_ppm * 1e-6)
        # early fits lean on a known starting frequency (its uncertainty plus the drift
        # allowance), not only on the few samples they have: a warm restart stays warm
        self._prior_sd = (PRIOR_SLOPE_SD if initial_frequency_sd_ppm is None else math.hypot(
            initial_frequency_sd_ppm, config.holdover_drift_ppm) * 1e-6)
        self._sys: tuple[float, float] | None = None  # (x, uncorrected offset) of last update
        self._basis: BoundBasis | None = None  # what the last update left for the bound
        self._est_error_s = MAX_BOUND_S
        self._last_sample_rx_t: float | None = None
        self._first_sample_t: float | None = None
        self._slew_end_t: float | None = None
        self._bound_deadline: float | None = None
        self._step_epoch = 0
        self._jumps = JumpState()
        self._verified = True  # False from a link loss until a sample after it agrees
        self._disruption = DisruptionState()  # guest_client.disruption
        self._last_decision = ""  # the step policy's last step or refusal, for status
        self._leap = 0
        self._last_offset: float | None = None
        self._offset_rms = OffsetRms()
        for source in sources:
            self._add(source)

    # --- sources --------------------------------------------------------------------------
    def _add(self, source: SourceConfig) -> Source:
        src = self._sources[source.name] = Source.new(source, self.config)
        return src

    def add_source(self, source: SourceConfig, now_ns: int) -> list[Action]:
        """Add a source (or re-arm an existing one after a reconnect, keeping its samples)."""
        at = self._tb.base_ns(now_ns)
        src = self._sources.get(source.name) or self._add(source)
        if self._started:
            src.arm(self.config.burst, at)
        return []

    def park(self, name: str) -> None:
        """Stop polling ``name`` until :meth:`add_source` re-arms it (an NTS source waiting
        for its keys: a poll that cannot be sent is not a missed reply)."""
        src = self._sources.get(name)
        if src is not None:
            src.next_poll, src.burst_left = None, 0

    def remove_source(self, name: str) -> None:
        self._sources.pop(name, None)

    def start(self, now_ns: int) -> list[Action]:
        """Begin polling every source (a burst first)."""
        at = self._tb.base_ns(now_ns)
        self._started = True
        for src in self._sources.values():
            src.arm(self.config.burst, at)
        return [SetKernelStatus(KernelStatus(synchronised=False))]

    # --- events ---------------------------------------------------------------------------
    def on_timer(self, now_ns: int) -> list[Action]:
        now, at = self._tb.t(now_ns), self._tb.base_ns(now_ns)
        actions: list[Action] = []
        if self._slew_end_t is not None and now >= self._slew_end_t - 1e-9:
            self._set_frequency(now_ns, -self._slope, actions)
        self._evaluate(now_ns, actions, kernel=self._sm.state == SyncState.HOLDOVER)
        for src in self._sources.values():
            due = src.next_poll is not None and at >= src.next_poll
            if due or src.exchanges.expired(at):  # a follow-up went unanswered: end its poll
                actions += self._end_poll(src, now_ns)
            if due:
                actions.append(self._request(src, now_ns))
        return actions

    def on_sent(self, source: str, tx_ns: int) -> None:
        src = self._sources.get(source)
        if src is not None:
            src.exchange.sent(tx_ns)

    def on_reply(self, source: str, data: bytes, rx_ns: int,
                 residence_in_ns: int = 0, residence_out_ns: int = 0) -> list[Action]:
        src = self._sources.get(source)
        if src is None:
            self._count("unknown_source", None)
            return []
        result = src.exchange.receive(data, rx_ns, residence_in_ns, residence_out_ns)
        if isinstance(result, Rejection):  # counted; a KoD obeyed; the poll ends with it
            self._count(result.reason, src)
            src.obey_kiss(result, self._tb.base_ns(rx_ns))
            return self._end_poll(src, rx_ns)
        if src.request_epoch != self._step_epoch:
            self._count("clock_stepped", src)  # measured across a step: meaningless
            return []
        src.reach |= 1
        src.status.reachable = True
        sample = src.exchanges.offer(result)
        if sample is None:  # another exchange of this poll follows at once
            return [self._request(src, rx_ns, follow_up=True)]
        return self._process(src, sample, rx_ns)

    def on_source_error(self, source: str, reason: str, now_ns: int) -> list[Action]:
        """The relay (or transport) reported a failed request, e.g. a timeout."""
        src = self._sources.get(source)
        self._count(reason, src)
        return [] if src is None else self._end_poll(src, now_ns)

    def _end_poll(self, src: Source, now_ns: int) -> list[Action]:
        """The poll ends early (an error, a rejection, a lost follow-up): use its best,
        unless the clock was stepped since the poll began."""
        best = src.exchanges.finish()
        if best is None or src.request_epoch != self._step_epoch:
            return []
        return self._process(src, best, now_ns)

    def on_connection_lost(self, now_ns: int,
                           sources: Iterable[str] | None = None) -> list[Action]:
        """The relay link dropped: stop polling its ``sources`` (all when None); a discontinuity.
        The state stays (the bound's age decides); the bound is unverified until a sample
        after the reconnect agrees. Re-arm with ``add_source``."""
        lost = set(self._sources) if sources is None else set(sources)
        for name in lost:
            src = self._sources.get(name)
            if src is not None:
                src.disconnect(self.config.max_root_distance_s)
        if self._basis is not None:
            self._verified = False
        return self.on_discontinuity(now_ns, Discontinuity.RECONNECT)

    def next_timer_ns(self) -> int | None:
        tb = self._tb
        times = [tb.reading_ns(t) for s in self._sources.values()
                 for t in (s.next_poll, s.exchanges.deadline) if t is not None]
        if tb.epoch_ns is not None:
            if self._slew_end_t is not None:
                times.append(tb.reading_of(self._slew_end_t))
            deadline = self._state_deadline()
            if deadline is not None:
                times.append(tb.reading_of(deadline))
        return min(times) if times else None

    # --- status ---------------------------------------------------------------------------
    def base_frequency_ppm(self) -> tuple[float, float | None]:
        """The correction that stops drift, no slew, and its sd (None while unknown), ppm:
        what a clean stop leaves on the clock and the frequency file keeps."""
        sd = self._slope_sd * 1e6 if math.isfinite(self._slope_sd) else None
        return -self._slope * 1e6, sd

    def _estimate(self, now_ns: int) -> float | None:
        """Estimated clock minus reference now (``error_bound(now_ns).estimate_s``)."""
        if self._sys is None:
            return None
        x, y = self._sys
        clock = self._tb.clock_s(now_ns)
        x_now = self._model.uncorrected(clock)
        return y + self._slope * (x_now - x) + self._model.correction_at(clock)

    @property
    def frequency_ppm(self) -> float:
        """Estimated native rate error of the clock (positive: runs fast)."""
        return self._slope / (1.0 - self._slope) * 1e6

    @property
    def disruption(self) -> DisruptionState:
        """Read-only view for the driver: how many disruptions, the last one's cause."""
        return self._disruption

    def error_bound(self, now_ns: int) -> ErrorBound:
        """The bound around the clock reading now (:mod:`guest_client.error_bound`)."""
        now = self._tb.t(now_ns)
        if self._disruption.active:  # no bound: the clock may be anywhere until confirmed
            return ErrorBound(now_ns, MAX_BOUND_S, self._estimate(now_ns),
                              self.config.max_clock_error_ppm * 1e-6, False)
        return compute(self._basis, now, now_ns, self._estimate(now_ns),
                       self.config.max_clock_error_ppm, self._jumps.widening_s, self._verified)

    def status(self, now_ns: int) -> ControllerStatus:
        """Current state; ``offset_s`` is the offset estimated at the last update (chrony's
        "last offset"); the offset now is ``error_bound(now_ns).estimate_s``."""
        now, tb = self._tb.t(now_ns), self._tb
        polls = [s.poll.poll for s in self._sources.values() if not s.disabled]
        for src in self._sources.values():
            src.status.samples = len(src.filter)
            src.status.reachable = src.reach != 0
        bound = self.error_bound(now_ns)
        last = self._last_update_t
        since = self._sm.since if self.state == SyncState.HOLDOVER else None
        return ControllerStatus(
            state=self.state.value, offset_s=self._last_offset, frequency_ppm=self.frequency_ppm,
            root_distance_s=root_distance(self._basis, now, self.config.holdover_drift_ppm),
            poll_s=float(2 ** min(polls)) if polls else float(2**self.config.minpoll),
            last_update=tb.reading_of(last) / _NS if last is not None else None,
            steps=self.steps, refused_jumps=self.refused_jumps, rejected=dict(self.rejected),
            sources=[s.status for s in self._sources.values()],
            holdover_s=now - last if since is not None and last is not None else 0.0,
            error_bound_s=bound.bound_s, error_bound_growth_ppm=bound.growth_ppm,
            bound_verified=bound.verified, state_reason=self._sm.reason.value,
            holdover_since=tb.reading_of(since) / _NS if since is not None else None,
            disagreement_s=self._jumps.disagreement_s, disrupted=self._disruption.active,
            disruption_cause=self._disruption.cause, disruptions=self._disruption.count,
            step_decision=self._last_decision)

    def tracking(self, now_ns: int) -> Tracking:
        """The ``chronyc tracking``/``sources`` figures; fills the sources' reach/poll columns."""
        return build_tracking(
            self._sources.values(), lambda t: self._tb.reading_of(t) / _NS,
            synced=self.state != "unsynchronised" and self._sys is not None, slope=self._slope,
            slope_sd=self._slope_sd, leap=self._leap, leap_mode=self.config.leap_mode,
            rms_offset_s=self._offset_rms.rms_s, remaining_s=self._estimate(now_ns))

    # --- internals: requests and rejections -------------------------------------------------
    def _request(self, src: Source, now_ns: int, follow_up: bool = False) -> SendRequest:
        cookie, at = self._rng.getrandbits(64) or 1, self._tb.base_ns(now_ns)
        return SendRequest(src.name, src.follow_up(cookie, now_ns, at) if follow_up
                           else src.request(cookie, self._step_epoch, now_ns, at,
                                            spread=self._rng.random()))

    def _count(self, reason: str, src: Source | None) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if src is not None:
            src.count(reason)

    # --- internals: the clock update ------------------------------------------------------
    def _process(self, src: Source, sample: Sample, now_ns: int) -> list[Action]:
        actions: list[Action] = []
        now = self._tb.t(now_ns)
        t_mid = self._tb.clock_s((sample.t1_ns + sample.t4_ns) // 2)  # the model's scale
        last_rx = self._last_sample_rx_t
        if last_rx is not None and now - last_rx > self.config.outage_s:
            self.on_discontinuity(now_ns, Discontinuity.OUTAGE)
        self._last_sample_rx_t = now
        corr = self._model.correction_at(t_mid)
        fs = FilteredSample(
            x=t_mid - corr, y=sample.offset_s - corr, delay_s=sample.path_delay_s,
            dispersion_s=sample.dispersion_s, root_distance_s=sample.root_distance_s,
            leap=sample.leap,
        )
        src.status.offset_s = sample.offset_s
        src.status.delay_s = sample.delay_s
        src.status.stratum = sample.stratum
        if self._sys is not None:
            x, y = self._sys
            jump = fs.y - (y + self._slope * (fs.x - x))
            if abs(jump) > self.config.step_threshold_s:
                return self._large_jump(src, fs, jump, now_ns)
            self._jumps.settle(self._sources.values())
            self._verified = True
            self._disruption.end()
        reason = src.filter.add(fs)
        if reason is not None:
            self._count(reason, src)
            return actions
        self._use(src, fs, now)
        self._update(now_ns, actions)
        return actions

    def _use(self, src: Source, fs: FilteredSample, now: float) -> None:
        src.last_sample, src.last_sample_t, src.dirty = fs, now, True
        if self._first_sample_t is None:
            self._first_sample_t = now

    def _update(self, now_ns: int, actions: list[Action]) -> None:
        now, clock = self._tb.t(now_ns), self._tb.clock_s(now_ns)
        if self._sys is None and not first_update_ready(self._sources.values(), now,
                                                         self._first_sample_t):
            return
        x_now = self._model.uncorrected(clock)
        cands, live = gather(self._sources.values(), now, x_now, self._slope, self.config,
                             self._prior_sd)
        cands, live = trust_bound(cands, live, self._sources, self._auth_names(), self._count)
        sel = select(cands)
        if sel is None:
            self._count("no_majority", None)
            return
        offset = sel.offset + self._model.correction_at(clock)
        step = abs(offset) > self.config.step_threshold_s and self.updates < self.config.step_limit
        if step and decide(boot_evidence(
                self._sources.values(), self._auth_names(), offset, sel.selected, live,
                self.config.step_threshold_s, self.config.jump_confirm_samples,
                self._jumps.discontinuity)).action != StepAction.STEP:
            self._count("step_unconfirmed", None)  # authenticated mode: not one sample
            return
        for src in live:
            src.status.selected = src.config.name in sel.selected
            src.status.note = "" if src.status.selected else "falseticker"
        self._slope = sel.slope
        self._slope_sd = min((freq_uncertainty(s, sel.slope) for s in live
                              if s.config.name in sel.selected), default=math.inf)
        self._sys = (x_now, sel.offset)
        if step:
            now_ns = self._step(now_ns, -offset, actions)
            clock = self._tb.clock_s(now_ns)  # ``now`` (elapsed) is where it was
            offset = sel.offset + self._model.correction_at(clock)
        bound_sd, guaranteed = bound_terms((s for s in live if s.config.name in sel.selected),
                                           sel.offset, sel.slope, x_now)
        self._basis = BoundBasis(now, max(sel.distance, guaranteed), bound_sd)
        self._last_offset = offset
        self._offset_rms.add(offset)
        self._est_error_s = min(sel.distance, max(
            (s.estimate.offset_sd for s in live if s.estimate), default=sel.distance))
        self._leap = sel.leap
        self.updates += 1
        freq, duration = slew_plan(offset * gain(offset, self._est_error_s, live), self._slope,
                                   self.config.max_slew_ppm, self.config.slew_time_s)
        self._model.set_frequency(clock, freq)
        actions.append(SetFrequency(freq * 1e6))
        self._slew_end_t = now + duration if duration > 0 else None
        self._evaluate(now_ns, actions, kernel=True)

    def frequency_applied(self, now_ns: int) -> None:
        """The driver applied the last ``SetFrequency`` at clock reading ``now_ns``."""
        self._model.applied_at(self._tb.clock_s(now_ns))

    def _set_frequency(self, now_ns: int, freq: float, actions: list[Action]) -> None:
        self._model.set_frequency(self._tb.clock_s(now_ns), freq)
        self._slew_end_t = None
        actions.append(SetFrequency(freq * 1e6))
