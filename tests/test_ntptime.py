"""NTP timestamp conversion: eras, rounding, short format and wrap-safe differences."""

from __future__ import annotations

import math

import ntplib
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from timesyncd.ntptime import (
    NTP_UNIX_DELTA_S,
    ntp_diff_s,
    ntp_to_unix_ns,
    seconds_to_short,
    short_to_seconds,
    unix_ns_to_ntp,
)

NS = 1_000_000_000
#: 2036-02-07T06:28:16Z, where the 32-bit NTP seconds counter wraps to era 1.
ERA1_UNIX_S = (1 << 32) - NTP_UNIX_DELTA_S
YEARS_68_NS = 68 * 365 * 86400 * NS


def test_known_values() -> None:
    assert unix_ns_to_ntp(0) == NTP_UNIX_DELTA_S << 32
    assert unix_ns_to_ntp(NS // 2) == (NTP_UNIX_DELTA_S << 32) | (1 << 31)
    assert ntp_to_unix_ns(NTP_UNIX_DELTA_S << 32, 0) == 0
    # agrees with ntplib's float conversion
    t = 1_700_000_000.25
    assert unix_ns_to_ntp(int(t * NS)) / 2**32 == ntplib.system_to_ntp_time(t)


def test_era_boundary_2036() -> None:
    before = (ERA1_UNIX_S - 1) * NS
    after = (ERA1_UNIX_S + 1) * NS + 250_000_000
    assert unix_ns_to_ntp(before) >> 32 == 0xFFFF_FFFF
    assert unix_ns_to_ntp(after) >> 32 == 1  # era 1, seconds counter restarted
    # either side of the boundary resolves correctly from a pivot on the other side
    assert ntp_to_unix_ns(unix_ns_to_ntp(after), before) == after
    assert ntp_to_unix_ns(unix_ns_to_ntp(before), after) == before
    assert ntp_diff_s(unix_ns_to_ntp(after), unix_ns_to_ntp(before)) == 2.25


def test_pivot_picks_the_nearest_era() -> None:
    ts = unix_ns_to_ntp(0)  # 1970: era 0
    assert ntp_to_unix_ns(ts, 30 * 365 * 86400 * NS) == 0
    # seen from 2110, the same bits mean 1970 + 136 years
    era_ns = (1 << 32) * NS
    assert ntp_to_unix_ns(ts, 140 * 365 * 86400 * NS) == era_ns


@given(unix_ns=st.integers(-NTP_UNIX_DELTA_S * NS, 200 * 365 * 86400 * NS),
       skew_ns=st.integers(-YEARS_68_NS, YEARS_68_NS))
def test_round_trip_within_68_years_of_pivot(unix_ns: int, skew_ns: int) -> None:
    back = ntp_to_unix_ns(unix_ns_to_ntp(unix_ns), unix_ns + skew_ns)
    assert abs(back - unix_ns) <= 1  # 2^-32 s resolution is below 1 ns


@given(frac=st.integers(0, (1 << 32) - 1), seconds=st.integers(0, (1 << 32) - 1))
@example(frac=(1 << 32) - 1, seconds=(1 << 32) - 1)
def test_rounding_is_to_nearest(frac: int, seconds: int) -> None:
    ntp = (seconds << 32) | frac
    ns = ntp_to_unix_ns(ntp, (seconds - NTP_UNIX_DELTA_S) * NS)
    exact_frac_ns = frac * NS / 2**32
    assert abs((ns - (seconds - NTP_UNIX_DELTA_S) * NS) - exact_frac_ns) <= 0.5
    # and back: the ns rounding moved it at most 0.5 ns = 2.15 units, so within 2 units
    # (modulo 2^64: the last fraction of era 0 may round up into era 1)
    assert abs(ntp_diff_s(unix_ns_to_ntp(ns), ntp)) <= 2 / 2**32


def test_unix_ns_to_ntp_rounds_up_at_the_half() -> None:
    # 1 ns = 4.294967296 units: rounds to 4; 3 ns = 12.88 units: rounds to 13
    base = NTP_UNIX_DELTA_S << 32
    assert unix_ns_to_ntp(1) - base == 4
    assert unix_ns_to_ntp(3) - base == 13
    # just below a whole second the fraction carries into the seconds field
    assert unix_ns_to_ntp(NS - 0) == base + (1 << 32)


def test_ntp_to_unix_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        ntp_to_unix_ns(1 << 64, 0)
    with pytest.raises(ValueError):
        ntp_to_unix_ns(-1, 0)


def test_ntp_diff_wraps_across_the_era() -> None:
    a = 5 << 31  # 2.5 s into era 1
    b = (1 << 64) - (1 << 31)  # 0.5 s before the wrap
    assert ntp_diff_s(a, b) == 3.0
    assert ntp_diff_s(b, a) == -3.0
    assert ntp_diff_s(a, a) == 0.0


@given(a=st.integers(0, (1 << 64) - 1), d=st.integers(-(1 << 62), 1 << 62))
def test_ntp_diff_inverts_addition_mod_2_64(a: int, d: int) -> None:
    b = (a + d) % (1 << 64)
    assert ntp_diff_s(b, a) == d / 2**32


def test_short_format() -> None:
    assert seconds_to_short(1.5) == 0x0001_8000
    assert short_to_seconds(0x0001_8000) == 1.5
    assert seconds_to_short(-1.0) == 0
    assert seconds_to_short(1e9) == 0xFFFF_FFFF  # saturates instead of overflowing 32 bits
    assert seconds_to_short(math.inf) == 0xFFFF_FFFF
    assert seconds_to_short(math.nan) == 0xFFFF_FFFF  # unknown error is the worst error
    assert short_to_seconds(0xFFFF_FFFF) == pytest.approx(65536.0)


@given(st.floats(0, 65535.0))
def test_short_round_trip_within_half_a_unit(seconds: float) -> None:
    assert abs(short_to_seconds(seconds_to_short(seconds)) - seconds) <= 0.5 / 65536
