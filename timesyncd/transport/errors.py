"""Transport errors that name the address and what went wrong."""

from __future__ import annotations

import errno

#: counter keys for socket errors people read (metrics, status), instead of class names
_REASONS = {errno.ECONNREFUSED: "connection_refused", errno.EHOSTUNREACH: "host_unreachable",
            errno.ENETUNREACH: "network_unreachable", errno.EMSGSIZE: "message_too_long"}


def os_error_reason(exc: OSError) -> str:
    """A stable snake_case key for a socket error (``connection_refused``), not Python's
    class name (``ConnectionRefusedError``)."""
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    name = errno.errorcode.get(exc.errno or 0)
    return name.lower().removeprefix("e") if name else "os_error"


class TransportError(ConnectionError):
    """Could not listen on or connect to an address; ``reason`` is a stable counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
