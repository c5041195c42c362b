"""A token bucket over caller-supplied monotonic nanoseconds (no clock reads: sans-IO)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "last_ns")

    def __init__(self, rate: float, burst: int | float, now_ns: int) -> None:
        self.rate = rate / 1e9
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last_ns = now_ns

    def take(self, now_ns: int) -> bool:
        tokens = self.tokens + (now_ns - self.last_ns) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.last_ns = now_ns
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
