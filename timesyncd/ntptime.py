"""NTP timestamp formats and era-safe conversion to and from Unix nanoseconds.

NTP timestamps are 64-bit fixed point (32.32) seconds since 1900 with no era number;
the era is recovered from a pivot (a Unix time known to be within 68 years), as
RFC 5905 section 6 describes.
"""

from __future__ import annotations

NTP_UNIX_DELTA_S = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_ERA_S = 1 << 32
_NS = 1_000_000_000
_MASK64 = (1 << 64) - 1


def unix_ns_to_ntp(unix_ns: int) -> int:
    """Unix nanoseconds to a 64-bit NTP timestamp (era bits dropped, rounded to nearest)."""
    total_ns = unix_ns + NTP_UNIX_DELTA_S * _NS
    seconds, frac_ns = divmod(total_ns, _NS)
    frac = (frac_ns << 32) // _NS + (((frac_ns << 32) % _NS) * 2 >= _NS)
    return ((seconds << 32) + frac) & _MASK64


def ntp_to_unix_ns(ntp: int, pivot_unix_ns: int) -> int:
    """64-bit NTP timestamp to Unix nanoseconds in the era that puts it nearest ``pivot``.

    Correct for any timestamp within 68 years of the pivot, in any NTP era.
    """
    if not 0 <= ntp <= _MASK64:
        raise ValueError(f"NTP timestamp out of 64-bit range: {ntp}")
    seconds = ntp >> 32
    frac_ns = ((ntp & 0xFFFF_FFFF) * _NS + (1 << 31)) >> 32
    pivot_ntp_s = pivot_unix_ns // _NS + NTP_UNIX_DELTA_S
    era = pivot_ntp_s // _ERA_S
    candidate = era * _ERA_S + seconds
    # choose the era whose value is closest to the pivot
    if candidate - pivot_ntp_s > _ERA_S // 2:
        candidate -= _ERA_S
    elif pivot_ntp_s - candidate > _ERA_S // 2:
        candidate += _ERA_S
    return (candidate - NTP_UNIX_DELTA_S) * _NS + frac_ns


def seconds_to_short(seconds: float) -> int:
    """Seconds to NTP short format (unsigned 16.16), saturating; NaN (unknown) is the maximum."""
    if seconds <= 0:
        return 0
    if not seconds < 65536:  # also catches inf and NaN, which int() cannot convert
        return 0xFFFF_FFFF
    return min(int(round(seconds * 65536)), 0xFFFF_FFFF)


def short_to_seconds(value: int) -> float:
    """NTP short format (16.16) to seconds."""
    return (value & 0xFFFF_FFFF) / 65536.0


def ntp_diff_s(a: int, b: int) -> float:
    """``a - b`` for two 64-bit NTP timestamps, as seconds, modulo the era (RFC 5905 A.5.2)."""
    d = (a - b) & _MASK64
    if d >= 1 << 63:
        d -= 1 << 64
    return d / 4294967296.0
