"""The exchanges of one poll: several back to back, the one of least path delay kept.

Why: through the relay the first exchange of a poll pays two cold wake-ups that no kernel
stamp sees (the relay waking to read the request, the guest waking to read the reply), and
they are not symmetric: on an idle host the relay's wake-up took ~210 us against the
guest's ~70 us, a steady +70 us offset error (docs/BENCHMARKS.md, "Warm exchanges"). An
exchange sent the moment the previous reply is read finds both processes awake: its
unmeasured legs fall to ~15-25 us and nearly even out. Least delay is also least error
bound (the error lies within half the path delay), so keeping that one is ntpd's clock
filter applied within a poll; CPU-load spikes that delay one exchange are skipped the same way.

Sans-IO: :class:`PollExchanges` is told of each sample and says whether another exchange
should follow or which sample the poll yields; the controller sends and times.
"""

from __future__ import annotations

from dataclasses import dataclass

from timesyncd.exchange import Sample

_NS = 1_000_000_000
#: How long a follow-up exchange may take before the poll ends without it (a lost datagram
#: gets no error from anyone), at most; never more than half the poll interval.
FOLLOW_UP_WAIT_S = 1.0


@dataclass
class PollExchanges:
    """Exchanges still to send in the current poll and the best sample so far."""

    per_poll: int = 1
    left: int = 0  # follow-up exchanges still to send in this poll
    best: Sample | None = None
    deadline: int | None = None  # elapsed ns: the poll ends here if a follow-up is unanswered

    def begin(self) -> None:
        """A poll's first request left: up to ``per_poll - 1`` follow-ups may come."""
        self.left, self.best, self.deadline = self.per_poll - 1, None, None

    def offer(self, sample: Sample) -> Sample | None:
        """A valid sample of this poll: ``None`` when a follow-up exchange should be sent
        now, else the poll's sample (the least path delay of those seen)."""
        if self.best is None or sample.path_delay_s < self.best.path_delay_s:
            self.best = sample
        if self.left > 0:
            self.left -= 1
            return None
        return self.finish()

    def follow_up_sent(self, at: int, poll_interval_s: float) -> None:
        """A follow-up left at elapsed ns ``at``: wait for it until the deadline."""
        self.deadline = at + round(min(FOLLOW_UP_WAIT_S, poll_interval_s / 2) * _NS)

    def expired(self, at: int) -> bool:
        return self.deadline is not None and at >= self.deadline

    def finish(self) -> Sample | None:
        """End the poll (its last reply, an error, or the deadline): the best sample, if
        any came. (Whether the clock was stepped since the poll began is the controller's
        check, on the source's ``request_epoch``, which follow-ups do not change.)"""
        best = self.best
        self.clear()
        return best

    def clear(self) -> None:
        self.left, self.best, self.deadline = 0, None, None
