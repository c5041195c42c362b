"""Reachability of one upstream or NTS-KE endpoint, like chrony's 8-bit reach register.

Each poll (a request to an upstream that ends in a reply or a failure, a connect to an NTS-KE
endpoint) shifts the register left and sets the low bit on success. The endpoint is reachable
while any of the last 8 polls succeeded. Sans-IO: the caller passes monotonic nanoseconds and
gets back the transition, if any, so it can log exactly one line per change.
"""

from __future__ import annotations

from dataclasses import dataclass

REACH_BITS = 8
_MASK = (1 << REACH_BITS) - 1


@dataclass(slots=True)
class Reach:
    register: int = 0
    polls: int = 0  # polls seen, so "never polled" differs from "8 failures"
    last_reply_ns: int | None = None  # monotonic ns of the last success
    #: what the last logged transition said (starts reachable: the first failure is news)
    reported_reachable: bool = True

    @property
    def reachable(self) -> bool:
        """Any success in the last 8 polls; an endpoint never polled counts as reachable."""
        return self.register != 0 or self.polls == 0

    @property
    def ratio(self) -> float:
        """Successes over the last min(8, polls) polls (1.0 before the first poll)."""
        seen = min(self.polls, REACH_BITS)
        return bin(self.register).count("1") / seen if seen else 1.0

    def poll(self, ok: bool, now_ns: int) -> str | None:
        """Record one poll; returns ``"unreachable"`` or ``"reachable"`` on a change of state
        (the first poll fails, or the 8th in a row does; the first success after that)."""
        self.register = ((self.register << 1) | int(ok)) & _MASK
        self.polls += 1
        if ok:
            self.last_reply_ns = now_ns
        now_reachable = self.register != 0
        if now_reachable == self.reported_reachable:
            return None
        self.reported_reachable = now_reachable
        return "reachable" if now_reachable else "unreachable"

    def age_s(self, now_ns: int) -> float | None:
        """Seconds since the last success, None if there was none."""
        return None if self.last_reply_ns is None else (now_ns - self.last_reply_ns) / 1e9

    def to_json(self, now_ns: int) -> dict[str, object]:
        age = self.age_s(now_ns)
        return {"reachable": self.reachable, "reach": f"{self.register:03o}",
                "reach_ratio": round(self.ratio, 3), "polls": self.polls,
                "last_reply_age_s": None if age is None else round(age, 3)}
