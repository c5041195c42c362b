"""One time source as the controller sees it: its exchange, sample filter, poll schedule,
reachability and the consecutive jumps it reported (for the jump guard).

Sans-IO like the controller: it builds request bytes and schedules the next poll in the
controller's elapsed ns (:class:`guest_client.timebase.TimeBase`, which a step does not
move); it never sends or sleeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from guest_client.actions import SourceStatus
from guest_client.poll_exchanges import PollExchanges
from timesyncd.discipline import DisciplineConfig
from timesyncd.exchange import ClientExchange, Rejection
from timesyncd.filter import FilteredSample, SampleFilter
from timesyncd.fit import Estimate
from timesyncd.poll import PollState

log = logging.getLogger(__name__)

_NS = 1_000_000_000
#: Interval between the requests of a start-up (or reconnect) burst, at most.
BURST_INTERVAL_S = 2.0
#: Each poll interval is stretched by a random fraction up to this (ntpd stretches by up to
#: 255/4096). Exact powers of two would keep every poll at the same phase of any periodic
#: host activity (a monitoring probe once a second, a cron job): if that activity disturbs
#: the exchanges, it would disturb every one of them the same way, a bias no delay weighting
#: can see. Stretched, the phase wanders and only some polls meet it. Never shortened, so a
#: server's rate limit for 2^poll still holds.
POLL_SPREAD = 1 / 16


@dataclass(frozen=True)
class SourceConfig:
    """One time source. ``trust="authenticated"`` (NTS) sources may confirm a clock jump
    without a guest-side discontinuity, since the host cannot forge them."""

    name: str
    trust: str = "host"
    exchanges: int = 1  # per poll, back to back; the least path delay is used


@dataclass
class Source:
    config: SourceConfig
    exchange: ClientExchange
    filter: SampleFilter
    poll: PollState
    status: SourceStatus
    next_poll: int | None = None  # elapsed ns (TimeBase.base_ns)
    burst_left: int = 0
    request_epoch: int = -1  # the controller's step epoch when the last request left
    reach: int = 0
    disabled: bool = False
    min_poll: int = -99  # raised by KoD RATE
    estimate: Estimate | None = None
    last_sample: FilteredSample | None = None
    last_sample_t: float | None = None  # controller (elapsed) seconds
    jumps: list[float] = field(default_factory=list)  # consecutive refused jumps, seconds
    dirty: bool = False  # a sample arrived since the last fit
    exchanges: PollExchanges = field(default_factory=PollExchanges)

    @classmethod
    def new(cls, config: SourceConfig, cfg: DisciplineConfig) -> Source:
        """A fresh source with the discipline's exchange, filter and poll settings."""
        return cls(config=config,
                   exchange=ClientExchange(max_root_distance_s=cfg.max_root_distance_s),
                   filter=SampleFilter(cfg.max_samples, cfg.max_delay_dev_ratio),
                   poll=PollState(cfg.minpoll),
                   status=SourceStatus(name=config.name, trust=config.trust),
                   exchanges=PollExchanges(max(config.exchanges, 1)))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def effective_poll(self) -> int:
        """log2 of the poll interval in use: the adaptive one, or more if a KoD asked."""
        return max(self.poll.poll, self.min_poll)

    def arm(self, burst: int, at: int) -> None:
        """Poll now (elapsed ns ``at``), starting with a burst of ``burst`` closely spaced
        requests."""
        if not self.disabled:
            self.burst_left = burst
            self.next_poll = at

    def request(self, cookie: int, step_epoch: int, now_ns: int, at: int,
                spread: float = 0.0) -> bytes:
        """The next request's bytes, sent at clock reading ``now_ns`` (elapsed ns ``at``);
        schedules the poll after it, the interval stretched by ``spread`` (0..1) of
        :data:`POLL_SPREAD`."""
        if self.exchange.outstanding:
            self.count("no_reply")
        self.reach = (self.reach << 1) & 0xFF
        poll = self.effective_poll
        data = self.exchange.request(cookie, now_ns, poll)
        self.request_epoch = step_epoch
        interval = 2.0**poll * (1.0 + POLL_SPREAD * spread)
        if self.burst_left > 0:  # a burst is short and over soon: no need to spread it
            self.burst_left -= 1
            interval = min(BURST_INTERVAL_S, 2.0**poll)
        self.next_poll = at + round(interval * _NS)
        self.exchanges.begin()
        return data

    def follow_up(self, cookie: int, now_ns: int, at: int) -> bytes:
        """A further exchange of the current poll, sent now (clock reading ``now_ns``,
        elapsed ns ``at``); the poll's schedule and reach register stay as they are."""
        data = self.exchange.request(cookie, now_ns, self.effective_poll)
        self.exchanges.follow_up_sent(at, 2.0**self.effective_poll)
        return data

    def count(self, reason: str) -> None:
        self.status.rejected[reason] = self.status.rejected.get(reason, 0) + 1

    def obey_kiss(self, rej: Rejection, at: int) -> None:
        """RATE: poll less often for good; DENY/RSTR: stop using this source (``at``:
        elapsed ns now)."""
        if rej.reason == "kod_rate":
            self.min_poll = min(self.effective_poll + 1, 17)
            self.poll.poll = self.effective_poll
            self.next_poll = at + round(2.0**self.min_poll * _NS)
            self.burst_left = 0
            self.status.note = f"server asked to slow down (KoD RATE); poll 2^{self.min_poll} s"
        elif rej.reason in ("kod_deny", "kod_rstr"):
            self.disabled = True
            self.next_poll = None
            self.forget_samples()
            self.status.selected = False
            self.status.note = f"server refused service (KoD {rej.kiss_code}); source disabled"
            log.warning("source %s disabled: %s", self.name, self.status.note)

    def disconnect(self, max_root_distance_s: float) -> None:
        """The link dropped: no polling, not reachable, no request in flight."""
        self.next_poll = None
        self.reach = 0
        self.status.reachable = False
        self.exchanges.clear()
        self.exchange = ClientExchange(max_root_distance_s=max_root_distance_s)

    def forget_samples(self) -> None:
        """After a step (or a refusal of service) the old samples say nothing."""
        self.filter.clear()
        self.exchanges.clear()
        self.estimate = None
        self.last_sample = None
        self.jumps.clear()
