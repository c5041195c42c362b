"""timesync shared core: NTP codec, relay framing, addresses, and clock discipline.

Everything in this package except ``timesyncd.transport`` and ``timesyncd.cli`` is
sans-IO: it takes bytes and timestamps as arguments and returns decisions.
"""

__version__ = "0.1.0"
