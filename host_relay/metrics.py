"""Relay metrics: cheap recording on the hot path, Prometheus families built at scrape time.

Nothing is registered globally: each service owns a ``CollectorRegistry`` whose only collector
reads the relay's counters, per-upstream figures and the guest registry when scraped. Guest
series exist while the guest is connected; a guest that left keeps only ``timesync_guest_up``
(0), its last-seen age and its info series, for the registry's TTL (bounded), so a "guest
missing" alert has something to fire on. The event loop that mutates the data is also the one
that renders it (no locks, no races). Names and labels follow docs/METRICS.md (the naming
table; a test keeps the two in step).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from host_relay.guest_registry import GuestRegistry
from host_relay.reach import Reach
from host_relay.stats import RelayStats
from timesyncd.health import STATES, HealthReport

#: Per-upstream label, named as chrony_exporter names its sources' (value: the upstream as
#: configured, ``udp:HOST:PORT``, or ``local`` when answering from the host clock).
SOURCE_LABEL = "source_address"

#: Upstream round trip as seen from the relay (loopback to WAN).
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0, 2.5)
#: Time a packet spends inside the relay, both directions summed.
RESIDENCE_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                     0.0025, 0.01, 0.1)


class Histogram:
    """Fixed buckets, plain counts in integer nanoseconds: ``observe_ns`` is one bisect and
    two integer additions (no float division on the hot path); seconds at scrape time."""

    __slots__ = ("bounds", "bounds_ns", "counts", "total_ns", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        #: bucket ``i`` counts values <= bounds[i]; ns bounds are exact for these decimal bounds
        self.bounds_ns = tuple(round(b * 1e9) for b in self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total_ns = 0
        self.count = 0

    def observe_ns(self, value_ns: int) -> None:
        self.counts[bisect.bisect_left(self.bounds_ns, value_ns)] += 1
        self.total_ns += value_ns
        self.count += 1

    def observe(self, value: float) -> None:
        """Seconds (for callers that have them); stored in ns."""
        self.observe_ns(round(value * 1e9))

    @property
    def total(self) -> float:
        """Sum of observations in seconds."""
        return self.total_ns / 1e9

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class UpstreamFigures:
    requests: int = 0
    replies: int = 0
    timeouts: int = 0
    cancelled: int = 0  # the guest went away first: its reply is not wanted
    failing: int = 0  # failures since the last reply (log gating per episode)
    stale: int = 0  # dropped unforwarded: queued past the guest's deadline (relay stall)
    reach: Reach = field(default_factory=Reach)
    reach_lost_ns: int = 0  # when it became unreachable (for the "back after" log line)
    errors: Counter[str] = field(default_factory=Counter)
    rtt: Histogram = field(default_factory=lambda: Histogram(RTT_BUCKETS))

    def result(self, reason: str, rtt_ns: int) -> None:
        """``reason`` as the upstream reports it: "" (a reply), "timeout", or an error."""
        if not reason:
            self.replies += 1
            self.rtt.observe_ns(rtt_ns)
        elif reason == "timeout":
            self.timeouts += 1
        else:
            self.errors[reason] += 1


class RelayMetrics:
    """What the service records per event, beyond :class:`RelayStats`."""

    def __init__(self, upstream_names: Iterable[str]) -> None:
        self.upstreams = {name: UpstreamFigures() for name in upstream_names}
        self.residence = Histogram(RESIDENCE_BUCKETS)

    def upstream_sent(self, name: str) -> None:
        self.upstreams[name].requests += 1

    def upstream_result(self, name: str, reason: str, rtt_ns: int) -> None:
        """See :meth:`UpstreamFigures.result` (the service calls that directly)."""
        self.upstreams[name].result(reason, rtt_ns)

    def upstream_error(self, name: str, reason: str) -> None:
        self.upstreams[name].errors[reason] += 1

    def observe_residence(self, residence_ns: int) -> None:
        self.residence.observe_ns(residence_ns)


class RelayCollector(Collector):
    """Renders everything the relay knows as Prometheus families, at scrape time."""

    def __init__(self, stats: RelayStats, metrics: RelayMetrics, guests: GuestRegistry,
                 in_flight: Callable[[str], int] | None = None,
                 nts_ke: Mapping[str, int] | None = None,
                 nts_ke_reach: Mapping[str, Reach] | None = None,
                 host: Callable[[], Iterator[Metric]] | None = None) -> None:
        self.stats = stats
        self.metrics = metrics
        self.guests = guests
        self.in_flight = in_flight
        self.nts_ke = nts_ke if nts_ke is not None else {}
        self.nts_ke_reach = nts_ke_reach if nts_ke_reach is not None else {}
        self.host = host  # process-level families (descriptors), if the service has them

    def collect(self) -> Iterator[Metric]:
        yield from self._relay()
        if self.host is not None:
            yield from self.host()
        yield from self._upstreams()
        yield from self._guests()

    def _relay(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily("timesync_relay_connections_open",
                                "Guest connections open now.", value=s.connections_open)
        yield CounterMetricFamily("timesync_relay_connections_accepted",
                                  "Guest connections accepted.", value=s.connections_accepted)
        yield CounterMetricFamily("timesync_relay_connections_refused",
                                  "Guest connections refused at max_connections.",
                                  value=s.connections_refused)
        yield GaugeMetricFamily("timesync_relay_guests",
                                "Guests connected past HELLO.", value=len(self.guests))
        frames = CounterMetricFamily("timesync_relay_frames", "Frames by direction and type.",
                                     labels=["direction", "type"])
        for direction, counts in (("in", s.frames_in), ("out", s.frames_out)):
            for ftype, n in sorted(counts.items()):
                frames.add_metric([direction, ftype], n)
        yield frames
        errors = CounterMetricFamily("timesync_relay_errors",
                                     "Guest-caused and transport errors by reason.",
                                     labels=["reason"])
        for reason, n in sorted(s.errors.items()):
            errors.add_metric([reason], n)
        yield errors
        yield CounterMetricFamily("timesync_relay_local_replies",
                                  "Requests answered from the host clock.", value=s.local_replies)
        yield CounterMetricFamily("timesync_relay_upstream_unsolicited",
                                  "Upstream datagrams matching no request.",
                                  value=s.upstream_unsolicited)
        yield CounterMetricFamily("timesync_relay_upstream_late",
                                  "Upstream replies to requests already timed out or cancelled.",
                                  value=s.upstream_late)
        ke = CounterMetricFamily("timesync_relay_nts_ke_streams",
                                 "NTS-KE pass-through streams by event (opened, connect_failed, "
                                 "stream_timeout, guest_disconnected, ...).", labels=["event"])
        for event, n in sorted(self.nts_ke.items()):
            ke.add_metric([event], n)
        yield ke
        h = self.metrics.residence
        yield HistogramMetricFamily("timesync_relay_residence_seconds",
                                    "Time a request and its reply spent inside the relay.",
                                    buckets=h.cumulative(), sum_value=h.total)

    def _upstreams(self) -> Iterator[Metric]:
        lbl = [SOURCE_LABEL]
        req = CounterMetricFamily("timesync_relay_upstream_requests", "Requests sent upstream.",
                                  labels=lbl)
        rep = CounterMetricFamily("timesync_relay_upstream_replies",
                                  "Replies matched to a request.", labels=lbl)
        tmo = CounterMetricFamily("timesync_relay_upstream_timeouts", "Requests that timed out.",
                                  labels=lbl)
        cnc = CounterMetricFamily("timesync_relay_upstream_cancelled",
                                  "Requests dropped because their guest disconnected first.",
                                  labels=lbl)
        err = CounterMetricFamily("timesync_relay_upstream_errors",
                                  "Requests failed other than by timeout, by reason.",
                                  labels=[SOURCE_LABEL, "reason"])
        inf = GaugeMetricFamily("timesync_relay_upstream_in_flight", "Requests awaiting a reply.",
                                labels=lbl)
        rtt = HistogramMetricFamily("timesync_relay_upstream_rtt_seconds",
                                    "Round trip from the relay to the upstream and back.",
                                    labels=lbl)
        stale = CounterMetricFamily("timesync_relay_upstream_stale",
                                    "Requests dropped unforwarded: read after a relay stall, "
                                    "possibly older than their guest's deadline.", labels=lbl)
        for name, fig in self.metrics.upstreams.items():
            req.add_metric([name], fig.requests)
            rep.add_metric([name], fig.replies)
            tmo.add_metric([name], fig.timeouts)
            cnc.add_metric([name], fig.cancelled)
            for reason, n in sorted(fig.errors.items()):
                err.add_metric([name, reason], n)
            if self.in_flight is not None:
                inf.add_metric([name], self.in_flight(name))
            rtt.add_metric([name], fig.rtt.cumulative(), fig.rtt.total)
            stale.add_metric([name], fig.stale)
        yield from (req, rep, tmo, cnc, err, inf, rtt, stale)
        yield from reach_families("timesync_relay_upstream", "upstream",
                                  ((n, f.reach) for n, f in self.metrics.upstreams.items()))
        yield from reach_families("timesync_relay_nts_ke", "NTS-KE endpoint",
                                  self.nts_ke_reach.items())

    def _guests(self) -> Iterator[Metric]:
        now = time.monotonic_ns()
        lbl = ["guest"]

        def gauge(metric: str, text: str, labels: list[str] = lbl) -> GaugeMetricFamily:
            return GaugeMetricFamily(metric, text, labels=labels)

        up = gauge("timesync_guest_up", "1 while the guest is connected; 0 for a while after "
                   "it left (the relay's guest TTL).")
        seen = gauge("timesync_guest_last_seen_age_seconds",
                     "Seconds since the guest was last connected (0 while it is).")
        info = gauge("timesync_guest_info", "The name the guest announced (untrusted, "
                     "display only; printable, at most 64 characters).", lbl + ["name"])
        conn_age = gauge("timesync_guest_connection_age_seconds",
                         "Seconds since the guest connected.")
        age = gauge("timesync_guest_report_age_seconds",
                    "Seconds since the guest's last health report.")
        state = gauge("timesync_guest_sync_state", "1 for the guest's current sync state.",
                      lbl + ["state"])
        offset = gauge("timesync_guest_offset_seconds",
                       "Estimated guest clock minus reference (positive: ahead).")
        freq = gauge("timesync_guest_frequency_ratio",
                     "Estimated native rate error of the guest clock as a ratio (1e-6 = 1 ppm; "
                     "positive: fast).")
        bound = gauge("timesync_guest_error_bound_seconds",
                      "The guest's error bound around its clock reading (the counterpart of "
                      "node_timex_maxerror_seconds).")
        dist = gauge("timesync_guest_root_distance_seconds",
                     "Root distance of the guest's last update (chrony's meaning).")
        disagree = gauge("timesync_guest_disagreement_seconds",
                         "Jump every usable source keeps reporting and the guest refuses "
                         "(0: none).")
        why = gauge("timesync_guest_state_reason", "1 for why the guest is in its state.",
                    lbl + ["reason"])
        last = gauge("timesync_guest_last_update_timestamp_seconds",
                     "Guest clock time of its last clock update.")
        poll = gauge("timesync_guest_poll_interval_seconds", "The guest's poll interval.")
        hold = gauge("timesync_guest_holdover_seconds", "Seconds the guest has been in holdover.")
        steps = CounterMetricFamily("timesync_guest_steps", "Clock steps by the guest.",
                                    labels=lbl)
        jumps = CounterMetricFamily("timesync_guest_refused_jumps",
                                    "Time jumps the guest refused to follow.", labels=lbl)
        disruptions = CounterMetricFamily(
            "timesync_guest_disruptions", "Clock disruptions the guest acted on (VMClock "
            "marker or generation change, detected restore; 0 from older guests).", labels=lbl)
        rej = CounterMetricFamily("timesync_guest_rejected_samples",
                                  "Samples the guest rejected, by reason.", labels=lbl + ["reason"])
        reports = CounterMetricFamily("timesync_guest_reports",
                                      "Health reports accepted from the guest.", labels=lbl)
        for gone in self.guests.gone(now):
            key = [gone.guest]
            up.add_metric(key, 0.0)
            seen.add_metric(key, (now - gone.gone_mono_ns) / 1e9)
            info.add_metric([*key, gone.name], 1.0)
        for g in self.guests.records():
            key = [g.guest]
            up.add_metric(key, 1.0)
            seen.add_metric(key, 0.0)
            info.add_metric([*key, g.name], 1.0)
            conn_age.add_metric(key, (now - g.connected_mono_ns) / 1e9)
            reports.add_metric(key, g.reports)
            r = g.report
            if r is None:
                continue
            age.add_metric(key, (now - g.report_mono_ns) / 1e9)
            for st in STATES:
                state.add_metric([*key, st], 1.0 if r.state == st else 0.0)
            ratio = r.frequency_ppm / 1e6 if r.frequency_ppm is not None else None
            for fam, value in ((offset, r.offset_s), (freq, ratio),
                               (bound, guest_error_bound_s(r)), (dist, r.root_distance_s),
                               (last, r.last_update), (poll, r.poll_s),
                               (disagree, r.disagreement_s)):
                if value is not None:
                    fam.add_metric(key, value)
            if r.state_reason is not None:
                why.add_metric([*key, r.state_reason], 1.0)
            hold.add_metric(key, r.holdover_s)
            steps.add_metric(key, r.steps)
            jumps.add_metric(key, r.refused_jumps)
            disruptions.add_metric(key, r.disruptions)
            for reason, n in sorted(r.rejected.items()):
                rej.add_metric([*key, reason], n)
        yield from (up, seen, info, conn_age, age, state, why, offset, freq, bound, dist,
                    disagree, last, poll, hold, steps, jumps, disruptions, rej, reports)


def guest_error_bound_s(report: HealthReport) -> float | None:
    """The one place the guest's error bound for ``timesync_guest_error_bound_seconds`` is
    chosen: the report's ``error_bound_s`` (the bound around the clock reading) when the guest
    sends one, else its root distance, the nearest figure older guests report."""
    bound = getattr(report, "error_bound_s", None)
    return bound if isinstance(bound, float) else report.root_distance_s


def reach_families(prefix: str, what: str,
                   reaches: Iterable[tuple[str, Reach]]) -> Iterator[Metric]:
    """Reachable, 8-poll reach ratio and last reply age, labelled ``source_address`` like the
    other upstream families (NTS-KE endpoints too, so one dashboard query fits both)."""
    now = time.monotonic_ns()
    lbl = [SOURCE_LABEL]
    ok = GaugeMetricFamily(f"{prefix}_reachable",
                           f"1 if the {what} answered any of its last 8 polls.", labels=lbl)
    ratio = GaugeMetricFamily(f"{prefix}_reach_ratio",
                              f"Share of the {what}'s last 8 polls that were answered.",
                              labels=lbl)
    age = GaugeMetricFamily(f"{prefix}_last_reply_age_seconds",
                            f"Seconds since the {what} last answered (absent: never).",
                            labels=lbl)
    for name, reach in reaches:
        ok.add_metric([name], 1.0 if reach.reachable else 0.0)
        ratio.add_metric([name], reach.ratio)
        seconds = reach.age_s(now)
        if seconds is not None:
            age.add_metric([name], seconds)
    yield from (ok, ratio, age)


def make_registry(collector: RelayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (version 0.0.4)."""
    return generate_latest(registry)


def status_document(collector: RelayCollector) -> dict[str, Any]:
    """The ``/status`` JSON: relay counters, per-upstream figures, every connected guest."""
    now = time.monotonic_ns()
    ups = []
    for name, fig in collector.metrics.upstreams.items():
        ups.append({
            "name": name, "requests": fig.requests, "replies": fig.replies,
            "timeouts": fig.timeouts, "cancelled": fig.cancelled, "errors": dict(fig.errors),
            "in_flight": collector.in_flight(name) if collector.in_flight else None,
            "mean_rtt_s": fig.rtt.total / fig.rtt.count if fig.rtt.count else None,
            "stale": fig.stale, **fig.reach.to_json(now),
        })
    ke = [{"name": name, **reach.to_json(now)} for name, reach in collector.nts_ke_reach.items()]
    return {"relay": collector.stats.snapshot(), "upstreams": ups,
            "nts_ke": dict(collector.nts_ke), "nts_ke_endpoints": ke,
            "guests": collector.guests.snapshot()}
