"""Adaptive poll interval of one source, driven by how long its fit stays valid."""

from __future__ import annotations

from dataclasses import dataclass

from timesyncd.fit import Estimate


@dataclass(slots=True)
class PollState:
    """Adaptive poll exponent of one source: up after a run of good fits, down on trouble."""

    poll: int
    score: int = 0

    def update(self, est: Estimate, minpoll: int, maxpoll: int) -> None:
        if est.used < est.total // 2 or est.used < 3:
            self.score -= 2  # the model went stale quickly: sample more often
        elif est.used >= 8:
            self.score += 1
        if self.score >= 4:
            self.poll = min(self.poll + 1, maxpoll)
            self.score = 0
        elif self.score <= -4:
            self.poll = max(self.poll - 1, minpoll)
            self.score = 0
        self.poll = max(minpoll, min(maxpoll, self.poll))

