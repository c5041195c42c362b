"""Discrete-event loop in true virtual time that drives the real ``GuestController``.

It does what the daemon does, with a :class:`~sim.clock.SimClock` instead of the system clock:
on the controller's timer it sends the requested packets through each upstream's
:class:`~sim.network.Network`; the :class:`Upstream` answers with
``timesyncd.server.build_server_reply`` stamped with true time plus its own error; replies go
to ``on_reply`` with the arrival time read from the SimClock; clock actions are applied to the
SimClock immediately, in order.

Hooks for scenarios built on top (e.g. the 7-day token run):

* ``Engine(..., sample_every_s=60, on_sample=fn)``: ``fn(engine)`` every N true seconds;
  read ``engine.now_s``, ``engine.clock.offset_s()``, ``engine.controller.status(...)``.
* ``engine.call_at(true_s, fn)``: run ``fn(engine)`` at a true time (token events, faults).
* ``engine.disconnect(start_s, duration_s)``: relay link down (``on_connection_lost``), then
  reconnect (``add_source`` for every upstream), as the daemon does.
* ``engine.pause(start_s, duration_s, on_resume)``: a snapshot and its restore: nothing runs
  meanwhile, the guest clock resumes where it stopped, the vsock transport is reset
  (``on_connection_lost``, reconnect) after ``on_resume(engine)`` (e.g. a VMClock disruption).
* Load coupling goes into the ``Oscillator`` (``extra_ppm``/``extra_mean_ppm``) and vsock
  queueing into ``Hop(load=..., queue_s=...)``; the engine itself is load-agnostic.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guest_client.actions import Action, SendRequest, SetFrequency, SetKernelStatus, StepClock
from guest_client.controller import GuestController, SourceConfig
from sim.clock import SimClock
from sim.network import Network
from timesyncd.server import build_server_reply

_NS = 1_000_000_000


@dataclass
class Upstream:
    """A simulated NTP server. ``error_s`` is its clock minus true time (constant or f(t))."""

    name: str
    network: Network = field(default_factory=Network)
    error_s: float | Callable[[float], float] = 0.0
    stratum: int = 1
    reference_id: bytes = b"GPS\0"
    leap: int = 0
    processing_s: float = 0.0
    root_delay_s: float = 0.0
    root_dispersion_s: float = 0.0
    kiss_code: str | None = None  # answer every request with this Kiss-o'-Death

    def clock_ns(self, start_unix_ns: int, true_s: float) -> int:
        err = self.error_s(true_s) if callable(self.error_s) else self.error_s
        return start_unix_ns + round((true_s + err) * _NS)

    def answer(self, request: bytes, start_unix_ns: int, rx_s: float, tx_s: float) -> bytes:
        if self.kiss_code is not None:
            return build_server_reply(
                request, self.clock_ns(start_unix_ns, rx_s), self.clock_ns(start_unix_ns, tx_s),
                stratum=0, reference_id=self.kiss_code.encode().ljust(4, b"\0")[:4],
                reference_ns=0)
        now_ns = self.clock_ns(start_unix_ns, rx_s)
        return build_server_reply(
            request, now_ns, self.clock_ns(start_unix_ns, tx_s), stratum=self.stratum,
            reference_id=self.reference_id, reference_ns=now_ns - 8 * _NS, leap=self.leap,
            root_delay_s=self.root_delay_s, root_dispersion_s=self.root_dispersion_s)


class Engine:
    """Event loop; create, optionally add hooks, then :meth:`run`."""

    def __init__(self, controller: GuestController, clock: SimClock,
                 upstreams: Sequence[Upstream], rng: random.Random, *,
                 sample_every_s: float | None = None,
                 on_sample: Callable[[Engine], Any] | None = None) -> None:
        self.controller = controller
        self.clock = clock
        self.upstreams = {u.name: u for u in upstreams}
        self.rng = rng
        self.sample_every_s = sample_every_s
        self.on_sample = on_sample
        self.now_s = 0.0
        self.link_up = True
        self._link_gen = 0
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._timer_ns: int | None = None
        self._timer_gen = 0
        self._started = False
        self.packets_sent = 0
        self.round_trips_s: list[float] = []  # true round trip of every answered request
        self.events = 0  # heap events processed (benchmarks normalise by this)
        #: called with every batch of controller actions once applied (e.g. to record the
        #: error bound the guest claims after each update)
        self.on_actions: Callable[[Engine, list[Action]], Any] | None = None

    # --- hooks -------------------------------------------------------------------------------
    def call_at(self, true_s: float, fn: Callable[[Engine], Any]) -> None:
        self._push(true_s, "call", fn)

    def disconnect(self, start_s: float, duration_s: float) -> None:
        self._push(start_s, "call", lambda e: e._link(False))
        self._push(start_s + duration_s, "call", lambda e: e._link(True))

    def pause(self, start_s: float, duration_s: float,
              on_resume: Callable[[Engine], Any] | None = None) -> None:
        def freeze(e: Engine) -> None:
            # the guest's timers and packets wait; replies in flight die with the transport
            # (just after the resume: nothing of the guest's runs before its clock is back;
            # in place: run() holds the list)
            e._heap[:] = [(t + duration_s + 1e-6 if kind in ("timer", "reply") else t, seq, kind,
                        data)
                       for t, seq, kind, data in e._heap]
            heapq.heapify(e._heap)
            e._link_gen += 1
            e.link_up = False
            e._push(start_s + duration_s, "call", resume)

        def resume(e: Engine) -> None:
            e.clock.resume_after_pause(duration_s)
            if on_resume is not None:
                on_resume(e)
            e._apply(e.controller.on_connection_lost(e.clock.now_ns()))
            e._link(True)

        self._push(start_s, "call", freeze)

    # --- loop --------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, data))

    def _apply(self, actions: list[Action]) -> None:
        clock = self.clock
        for action in actions:
            if isinstance(action, SetFrequency):  # the most common action first
                clock.set_frequency(action.ppm)
            elif isinstance(action, SendRequest):
                self._send(action)
            elif isinstance(action, StepClock):
                clock.step(action.offset_ns)
            elif isinstance(action, SetKernelStatus):
                clock.set_kernel_status(action.status)
        self._reschedule()
        if self.on_actions is not None:
            self.on_actions(self, actions)

    def _reschedule(self) -> None:
        nt = self.controller.next_timer_ns()
        if nt == self._timer_ns:
            return
        self._timer_ns = nt
        self._timer_gen += 1
        if nt is not None:
            self._push(self.clock.true_time_at(nt), "timer", self._timer_gen)

    def _send(self, req: SendRequest) -> None:
        upstream = self.upstreams.get(req.source)
        if upstream is None or not self.link_up:
            return
        self.packets_sent += 1
        there = upstream.network.request(self.now_s, self.rng)
        if there is None:
            return
        rx_s, r_in = there
        tx_s = rx_s + upstream.processing_s
        reply = upstream.answer(req.data, self.clock.start_unix_ns, rx_s, tx_s)
        back = upstream.network.reply(tx_s, self.rng)
        if back is None:
            return
        arrive_s, r_out = back
        self.round_trips_s.append(arrive_s - self.now_s)
        self._push(arrive_s, "reply",
                   (self._link_gen, req.source, reply, round(r_in * _NS), round(r_out * _NS)))

    def _link(self, up: bool) -> None:
        now_ns = self.clock.now_ns()
        self._link_gen += 1
        self.link_up = up
        if not up:
            self._apply(self.controller.on_connection_lost(now_ns))
            return
        actions: list[Action] = []
        for name in self.upstreams:
            actions += self.controller.add_source(SourceConfig(name), now_ns)
        actions += self.controller.on_timer(now_ns)
        self._apply(actions)

    def run(self, until_s: float) -> None:
        """Process events up to true time ``until_s`` (can be called again to continue)."""
        clock, ctl = self.clock, self.controller
        if not self._started:
            self._started = True
            if self.sample_every_s:
                self._push(0.0, "sample", None)
            now_ns = clock.now_ns()
            actions: list[Action] = []
            for name in self.upstreams:
                actions += ctl.add_source(SourceConfig(name), now_ns)
            actions += ctl.start(now_ns)
            actions += ctl.on_timer(now_ns)
            self._apply(actions)
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= until_s:
            t, _, kind, data = pop(heap)
            if kind == "timer" and data != self._timer_gen:
                continue
            self.events += 1
            clock.advance_to(t)
            if t > self.now_s:
                self.now_s = t
            if kind == "timer":
                now_ns = clock.now_ns()
                assert self._timer_ns is not None
                if now_ns < self._timer_ns:  # rate estimate was a little off: wake again
                    self._push(max(clock.true_time_at(self._timer_ns), t + 1e-9), "timer", data)
                    continue
                self._timer_ns = None
                self._apply(ctl.on_timer(now_ns))
            elif kind == "reply":
                gen, source, reply, r_in, r_out = data
                if gen == self._link_gen:
                    self._apply(ctl.on_reply(source, reply, clock.now_ns(), r_in, r_out))
            elif kind == "sample":
                assert self.on_sample is not None and self.sample_every_s
                self.on_sample(self)
                self._push(t + self.sample_every_s, "sample", None)
            else:
                data(self)
        clock.advance_to(until_s)
        self.now_s = max(self.now_s, until_s)
