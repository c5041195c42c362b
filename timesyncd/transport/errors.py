"""Transport errors that name the address and what went wrong."""

from __future__ import annotations


class TransportError(ConnectionError):
    """Could not listen on or connect to an address; ``reason`` is a stable counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
