"""The guest's clock controller, sans-IO: events in, actions out (daemon and simulator share it).

All times passed in are readings of the clock being disciplined (Unix ns). The controller
never reads a clock: the driver applies the returned actions to its ``Clock`` at once, in
order, and reports replies with the clock reading at arrival.

Flow per reply: ``ClientExchange`` checks it -> jump guard (step / refuse / confirm) ->
per-source ``SampleFilter`` -> regression ``fit`` -> ``select`` over sources -> slew plan.
Samples are kept in the clock's uncorrected time scale (``CorrectionModel``), so slews and
steps never invalidate them.
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
    SourceStatus,
    StepClock,
)
from guest_client.jump_guard import confirmed_jump, jump_confirmed
from guest_client.source import BURST_INTERVAL_S, Source, SourceConfig
from guest_client.tracking import OffsetRms, Tracking, build_tracking
from timesyncd.clock import KernelStatus
from timesyncd.discipline import (
    MIN_WINDOW,
    CorrectionModel,
    DisciplineConfig,
    Estimate,
    PollState,
    fit_early,
    fit_filter,
    slew_plan,
)
from timesyncd.exchange import PHI, ClientExchange, Rejection, Sample
from timesyncd.filter import FilteredSample, SampleFilter
from timesyncd.packet import Leap
from timesyncd.selection import Candidate, select
from timesyncd.trust import OUTSIDE_AUTHENTICATED_BOUNDS, bound_by_authenticated

log = logging.getLogger(__name__)

__all__ = ["GuestController", "SourceConfig"]

_NS = 1_000_000_000
#: Kernel maxerror/esterror saturate here (Linux NTP_PHASE_LIMIT is 16 s).
_MAX_KERNEL_ERROR_S = 16.0


class GuestController:
    """Disciplines one clock from one or more NTP sources by slewing; see the module doc."""

    def __init__(self, config: DisciplineConfig, rng: random.Random,
                 sources: Iterable[SourceConfig] = ()) -> None:
        self.config = config
        self._rng = rng
        self._sources: dict[str, Source] = {}
        self._epoch_ns: int | None = None
        self._model = CorrectionModel()
        self._started = False
        self.state = "unsynchronised"
        self.updates = 0
        self.steps = 0
        self.refused_jumps = 0
        self.rejected: dict[str, int] = {}
        self._slope = 0.0  # native rate error of the uncorrected clock (fraction)
        self._slope_sd = math.inf
        self._sys: tuple[float, float] | None = None  # (x, uncorrected offset) of last update
        self._error_s = _MAX_KERNEL_ERROR_S  # error bound at the last update
        self._est_error_s = _MAX_KERNEL_ERROR_S
        self._last_update_t: float | None = None
        self._last_sample_rx_t: float | None = None
        self._first_sample_t: float | None = None
        self._slew_end_t: float | None = None
        self._step_epoch = 0
        self._discontinuity = False
        self._leap = 0
        self._last_offset: float | None = None
        self._offset_rms = OffsetRms()
        for source in sources:
            self._add(source)

    # --- time helpers -------------------------------------------------------------------
    def _t(self, ns: int) -> float:
        if self._epoch_ns is None:
            self._epoch_ns = ns
        return (ns - self._epoch_ns) / _NS

    def _ns(self, t: float) -> int:
        assert self._epoch_ns is not None
        return self._epoch_ns + round(t * _NS)

    # --- sources --------------------------------------------------------------------------
    def _add(self, source: SourceConfig) -> Source:
        cfg = self.config
        src = Source(
            config=source,
            exchange=ClientExchange(max_root_distance_s=cfg.max_root_distance_s),
            filter=SampleFilter(cfg.max_samples, cfg.max_delay_dev_ratio),
            poll=PollState(cfg.minpoll),
            status=SourceStatus(name=source.name, trust=source.trust,
                                authenticated=source.trust == "authenticated"),
        )
        self._sources[source.name] = src
        return src

    def add_source(self, source: SourceConfig, now_ns: int) -> list[Action]:
        """Add a source (or re-arm an existing one after a reconnect, keeping its samples)."""
        self._t(now_ns)
        src = self._sources.get(source.name) or self._add(source)
        if self._started:
            src.arm(self.config.burst, now_ns)
        return []

    def park(self, name: str) -> None:
        """Stop polling ``name`` until :meth:`add_source` re-arms it (an NTS source waiting
        for its keys: a poll that cannot be sent is not a missed reply)."""
        src = self._sources.get(name)
        if src is not None:
            src.next_poll_ns, src.burst_left = None, 0

    def remove_source(self, name: str) -> None:
        self._sources.pop(name, None)

    def start(self, now_ns: int) -> list[Action]:
        """Begin polling every source (a burst first)."""
        self._t(now_ns)
        self._started = True
        for src in self._sources.values():
            src.arm(self.config.burst, now_ns)
        return [SetKernelStatus(KernelStatus(synchronised=False))]

    # --- events ---------------------------------------------------------------------------
    def on_timer(self, now_ns: int) -> list[Action]:
        now = self._t(now_ns)
        actions: list[Action] = []
        if self._slew_end_t is not None and now >= self._slew_end_t - 1e-9:
            self._set_frequency(now, -self._slope, actions)
        self._check_holdover(now, actions)
        for src in self._sources.values():
            if src.next_poll_ns is not None and now_ns >= src.next_poll_ns:
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
        if isinstance(result, Rejection):
            self._rejected(src, result, rx_ns)
            return []
        if src.request_epoch != self._step_epoch:
            self._count("clock_stepped", src)  # measured across a step: meaningless
            return []
        src.reach |= 1
        src.status.reachable = True
        return self._process(src, result, rx_ns)

    def on_source_error(self, source: str, reason: str, now_ns: int) -> list[Action]:
        """The relay (or transport) reported a failed request, e.g. a timeout."""
        self._count(reason, self._sources.get(source))
        return []

    def on_connection_lost(self, now_ns: int,
                           sources: Iterable[str] | None = None) -> list[Action]:
        """The relay link dropped: stop polling the sources it carried (``sources``; all
        when None), and treat it as a guest-side discontinuity (the next large jump may be
        stepped once confirmed). Holdover follows unless a source off the link (a direct UDP
        server) is still polled and reachable. Re-arm with ``add_source`` after reconnecting."""
        now = self._t(now_ns)
        self._discontinuity = True
        lost = set(self._sources) if sources is None else set(sources)
        for name in lost:
            src = self._sources.get(name)
            if src is not None:
                src.disconnect(self.config.max_root_distance_s)
        actions: list[Action] = []
        others_live = any(
            s.next_poll_ns is not None and s.reach != 0 and not s.disabled
            for n, s in self._sources.items() if n not in lost)
        if self.state == "synchronised" and not others_live:
            self._enter_holdover(now, actions)
        return actions

    def next_timer_ns(self) -> int | None:
        times = [s.next_poll_ns for s in self._sources.values() if s.next_poll_ns is not None]
        if self._epoch_ns is not None:
            if self._slew_end_t is not None:
                times.append(self._ns(self._slew_end_t))
            deadline = self._state_deadline()
            if deadline is not None:
                times.append(self._ns(deadline))
        return min(times) if times else None

    # --- status ---------------------------------------------------------------------------
    def current_offset(self, now_ns: int) -> float | None:
        """Estimated offset of the clock from the reference now (guest minus reference)."""
        if self._sys is None:
            return None
        now = self._t(now_ns)
        x, y = self._sys
        x_now = self._model.uncorrected(now)
        return y + self._slope * (x_now - x) + self._model.correction_at(now)

    def status(self, now_ns: int) -> ControllerStatus:
        """Current state; ``offset_s`` is the offset estimated at the last clock update (the
        amount then corrected, like chrony's "last offset"); see :meth:`current_offset`."""
        now = self._t(now_ns)
        polls = [s.poll.poll for s in self._sources.values() if not s.disabled]
        for src in self._sources.values():
            src.status.samples = len(src.filter)
            src.status.reachable = src.reach != 0
        return ControllerStatus(
            state=self.state,
            offset_s=self._last_offset,
            frequency_ppm=self._slope / (1.0 - self._slope) * 1e6,
            root_distance_s=self._error_bound(now) if self._sys is not None else None,
            poll_s=float(2 ** min(polls)) if polls else float(2**self.config.minpoll),
            last_update=(self._ns(self._last_update_t) / _NS
                         if self._last_update_t is not None else None),
            steps=self.steps,
            refused_jumps=self.refused_jumps,
            rejected=dict(self.rejected),
            sources=[s.status for s in self._sources.values()],
            holdover_s=(now - self._last_update_t
                        if self.state == "holdover" and self._last_update_t is not None
                        else 0.0),
        )

    def tracking(self, now_ns: int) -> Tracking:
        """The ``chronyc tracking``/``sources`` figures; fills the sources' reach/poll columns."""
        return build_tracking(
            self._sources.values(), lambda t: self._ns(t) / _NS,
            synced=self.state != "unsynchronised" and self._sys is not None, slope=self._slope,
            slope_sd=self._slope_sd, leap=self._leap, leap_mode=self.config.leap_mode,
            rms_offset_s=self._offset_rms.rms_s, remaining_s=self.current_offset(now_ns))

    # --- internals: requests and rejections -------------------------------------------------
    def _request(self, src: Source, now_ns: int) -> SendRequest:
        cookie = self._rng.getrandbits(64) or 1
        return SendRequest(src.name, src.request(cookie, self._step_epoch, now_ns))

    def _count(self, reason: str, src: Source | None) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if src is not None:
            src.count(reason)

    def _rejected(self, src: Source, rej: Rejection, now_ns: int) -> None:
        self._count(rej.reason, src)
        src.obey_kiss(rej, now_ns)

    # --- internals: the clock update ------------------------------------------------------
    def _process(self, src: Source, sample: Sample, now_ns: int) -> list[Action]:
        actions: list[Action] = []
        now = self._t(now_ns)
        t_mid = self._t((sample.t1_ns + sample.t4_ns) // 2)
        last_rx = self._last_sample_rx_t
        if last_rx is not None and now - last_rx > self.config.outage_s:
            self._discontinuity = True
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
                if self.updates >= self.config.step_limit:
                    return self._refuse_or_confirm(src, fs, jump, now_ns)
                now_ns = self._step(now_ns, -jump, actions)
                self._clear_samples()
            else:
                for s in self._sources.values():
                    s.jumps.clear()
                self._discontinuity = False
        reason = src.filter.add(fs)
        if reason is not None:
            self._count(reason, src)
            return actions
        src.last_sample = fs
        src.last_sample_t = now
        src.dirty = True
        if self._first_sample_t is None:
            self._first_sample_t = now
        self._update(now_ns, actions)
        return actions

    def _refuse_or_confirm(self, src: Source, fs: FilteredSample, jump: float,
                           now_ns: int) -> list[Action]:
        """A large jump after the initial updates: refuse it unless it is confirmed."""
        src.jumps.append(jump)
        if not jump_confirmed(self._sources.values(), self.config.jump_confirm_samples,
                              max(self.config.step_threshold_s / 10, 1e-3),
                              self._discontinuity):
            self.refused_jumps += 1
            src.status.note = f"refused jump of {jump:+.6f} s"
            log.warning("refused clock jump of %+.6f s from %s", jump, src.config.name)
            return []
        actions: list[Action] = []
        size = confirmed_jump(self._sources.values())
        now_ns = self._step(now_ns, -size, actions)
        self._clear_samples()
        self._discontinuity = False
        src.status.note = f"stepped confirmed jump of {size:+.6f} s"
        log.warning("stepped the clock by %+.6f s (confirmed jump)", -size)
        src.filter.add(fs)
        src.last_sample = fs
        src.dirty = True
        src.last_sample_t = self._t(now_ns)
        self._update(now_ns, actions)
        return actions

    def _trust_bound(self, cands: list[Candidate], live: list[Source]
                     ) -> tuple[list[Candidate], list[Source]]:
        """With authenticated sources configured, host-trusted ones count only inside the
        interval the authenticated ones allow (see :mod:`timesyncd.trust`)."""
        auth = {s.config.name for s in self._sources.values()
                if s.config.trust == "authenticated"}
        if not auth:
            return cands, live
        bound = bound_by_authenticated(cands, auth)
        for name, reason in bound.rejected.items():
            src = self._sources[name]
            self._count(reason, src)
            src.status.selected = False
            src.status.note = ("outside the bounds of the authenticated sources"
                               if reason == OUTSIDE_AUTHENTICATED_BOUNDS
                               else "unused: no authenticated source to bound it")
        kept = {c.name for c in bound.kept}
        return list(bound.kept), [s for s in live if s.config.name in kept]

    def _ready(self, now: float) -> bool:
        """Hold the first update until every armed source answered (or 2 s passed) so a
        single falseticker cannot take the initial step."""
        if self._sys is not None:
            return True
        pending = [s for s in self._sources.values()
                   if not s.disabled and s.next_poll_ns is not None and s.last_sample is None]
        assert self._first_sample_t is not None
        return not pending or now - self._first_sample_t >= BURST_INTERVAL_S

    def _update(self, now_ns: int, actions: list[Action]) -> None:
        now = self._t(now_ns)
        if not self._ready(now):
            return
        x_now = self._model.uncorrected(now)
        cands: list[Candidate] = []
        live: list[Source] = []
        max_age = self._holdover_after()
        for src in self._sources.values():
            if src.disabled or src.last_sample is None or src.last_sample_t is None:
                continue
            age = now - src.last_sample_t
            if age > max_age:
                continue
            est = self._refit(src, x_now)
            if est is None:
                continue
            dist = src.filter.best_distance(x_now, PHI) + 2 * est.offset_sd
            cands.append(Candidate(src.config.name, est.offset, est.slope, dist,
                                   src.last_sample.leap))
            live.append(src)
        cands, live = self._trust_bound(cands, live)
        sel = select(cands)
        if sel is None:
            self._count("no_majority", None)
            return
        for src in live:
            src.status.selected = src.config.name in sel.selected
            src.status.note = "" if src.status.selected else "falseticker"
        self._slope = sel.slope
        self._slope_sd = min((s.estimate.slope_sd for s in live
                              if s.estimate and s.config.name in sel.selected), default=math.inf)
        self._sys = (x_now, sel.offset)
        offset = sel.offset + self._model.correction_at(now)
        if abs(offset) > self.config.step_threshold_s and self.updates < self.config.step_limit:
            now_ns = self._step(now_ns, -offset, actions)
            now = self._t(now_ns)
            offset = sel.offset + self._model.correction_at(now)
        self._error_s = sel.distance
        self._last_offset = offset
        self._offset_rms.add(offset)
        self._est_error_s = min(sel.distance, max(
            (s.estimate.offset_sd for s in live if s.estimate), default=sel.distance))
        self._leap = sel.leap
        self.updates += 1
        self._last_update_t = now
        self.state = "synchronised"
        freq, duration = slew_plan(offset * self._gain(offset, live), self._slope,
                                   self.config.max_slew_ppm, self.config.slew_time_s)
        self._model.set_frequency(now, freq)
        actions.append(SetFrequency(freq * 1e6))
        self._slew_end_t = now + duration if duration > 0 else None
        actions.append(SetKernelStatus(self._kernel_status(now)))

    def _gain(self, offset: float, live: list[Source]) -> float:
        """Share of ``offset`` to correct now: all of it when it is well above its uncertainty,
        less when it may be noise (the rest, if real, is corrected by later updates).

        Until a window has filled, the path floor itself is unknown: a sample's error may be
        up to half its delay, shrinking as samples accumulate."""
        sd = self._est_error_s
        for src in live:
            n = len(src.filter)
            floor = src.filter.delay_floor()
            if n < MIN_WINDOW and floor is not None:
                sd = max(sd, floor / (2.0 * math.sqrt(n)))
        var = offset * offset
        return var / (var + sd * sd) if var > 0 else 1.0

    def _refit(self, src: Source, x_now: float) -> Estimate | None:
        """Fit the source's samples (pruning stale ones) and adapt its poll interval."""
        if src.dirty or src.estimate is None:
            src.dirty = False
            n = len(src.filter)
            # a filling window's floor is unknown: fit_early does not trust it
            est = (fit_early(src.filter.samples, x_now, self._slope) if 2 <= n < MIN_WINDOW
                   else fit_filter(src.filter, x_now, self._slope))
            if est is None:
                return None
            src.filter.prune(est.used)
            src.poll.update(est, self.config.minpoll, self.config.maxpoll)
            src.estimate = est
            src.status.jitter_s = est.offset_sd
            return est
        est = src.estimate
        assert est is not None
        return Estimate(x_now, est.offset + est.slope * (x_now - est.x), est.slope,
                        est.offset_sd, est.slope_sd, est.used, est.total)

    def _set_frequency(self, now: float, freq: float, actions: list[Action]) -> None:
        self._model.set_frequency(now, freq)
        self._slew_end_t = None
        actions.append(SetFrequency(freq * 1e6))

    def _step(self, now_ns: int, delta_s: float, actions: list[Action]) -> int:
        """Step the clock by ``delta_s``; returns the clock reading right after the step."""
        now = self._t(now_ns)
        delta_ns = round(delta_s * _NS)
        self._model.step(now, delta_ns / _NS)
        self._step_epoch += 1
        self.steps += 1
        actions.append(StepClock(delta_ns))
        log.warning("stepped the clock by %+.9f s", delta_ns / _NS)
        for src in self._sources.values():
            src.shift(delta_ns)
        shift = delta_ns / _NS
        for attr in ("_last_update_t", "_last_sample_rx_t", "_first_sample_t", "_slew_end_t"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, value + shift)
        return now_ns + delta_ns

    def _clear_samples(self) -> None:
        for src in self._sources.values():
            src.forget_samples()
        self._sys = None

    # --- internals: holdover and kernel status --------------------------------------------------
    def _holdover_after(self) -> float:
        """Silence longer than this many (longest) poll intervals means holdover."""
        poll = -99
        for s in self._sources.values():
            if not s.disabled:
                poll = max(poll, s.effective_poll)
        return self.config.holdover_polls * 2.0 ** (poll if poll > -99 else self.config.maxpoll)

    def _error_bound(self, now: float) -> float:
        if self._last_update_t is None:
            return _MAX_KERNEL_ERROR_S
        age = max(now - self._last_update_t, 0.0)
        rate = self.config.holdover_drift_ppm * 1e-6 + min(self._slope_sd, 1e-3)
        return min(self._error_s + rate * age, _MAX_KERNEL_ERROR_S)

    def _state_deadline(self) -> float | None:
        if self._last_update_t is None:
            return None
        if self.state == "synchronised":
            return self._last_update_t + self._holdover_after()
        if self.state == "holdover":
            rate = self.config.holdover_drift_ppm * 1e-6 + min(self._slope_sd, 1e-3)
            if rate <= 0:
                return None
            return self._last_update_t + max(self.config.max_error_s - self._error_s, 0) / rate
        return None

    def _check_holdover(self, now: float, actions: list[Action]) -> None:
        if self._last_update_t is None:
            return
        silent_until = self._last_update_t + self._holdover_after()
        if self.state == "synchronised" and now >= silent_until - 1e-6:
            self._enter_holdover(now, actions)
        if self.state == "holdover":
            deadline = self._state_deadline()
            if deadline is None or now >= deadline - 1e-6:
                self.state = "unsynchronised"
                log.warning("holdover error bound passed %.3f s: unsynchronised",
                            self.config.max_error_s)
            actions.append(SetKernelStatus(self._kernel_status(now)))  # error bound grew

    def _enter_holdover(self, now: float, actions: list[Action]) -> None:
        """No fresh samples: keep the learned frequency, stop slewing the phase."""
        self.state = "holdover"
        log.warning("no usable samples: holdover on the learned frequency")
        self._set_frequency(now, -self._slope, actions)
        actions.append(SetKernelStatus(self._kernel_status(now)))

    def _kernel_status(self, now: float) -> KernelStatus:
        synced = self.state == "synchronised"
        leap = Leap(self._leap) if (self.config.leap_mode == "kernel" and synced
                                    and self._leap in (1, 2)) else Leap.NONE
        bound = self._error_bound(now)
        return KernelStatus(synchronised=synced, maxerror_s=bound,
                            esterror_s=min(self._est_error_s, bound), leap=leap)
