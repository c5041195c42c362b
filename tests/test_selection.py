from __future__ import annotations

from timesyncd.selection import Candidate, select


def test_falseticker_out_and_weighted_combination() -> None:
    sel = select([Candidate("a", 0.001, 1e-5, 0.001), Candidate("b", 0.0012, 1e-5, 0.002),
                  Candidate("c", 0.050, 0.0, 0.001)])
    assert sel is not None
    assert sel.selected == ("a", "b") and sel.falsetickers == ("c",)
    # weights 1/d^2: a counts four times b
    assert abs(sel.offset - (4 * 0.001 + 0.0012) / 5) < 1e-12


def test_no_majority_gives_none() -> None:
    assert select([Candidate("a", 0.0, 0.0, 0.001), Candidate("b", 1.0, 0.0, 0.001)]) is None
    assert select([]) is None


def test_single_source_and_leap_majority() -> None:
    one = select([Candidate("a", 0.3, 2e-6, 0.01, leap=1)])
    assert one is not None and one.offset == 0.3 and one.leap == 1
    sel = select([Candidate("a", 0.0, 0.0, 0.01, 1), Candidate("b", 0.0, 0.0, 0.01, 1),
                  Candidate("c", 0.0, 0.0, 0.01, 0)])
    assert sel is not None and sel.leap == 1
    sel = select([Candidate("a", 0.0, 0.0, 0.01, 1), Candidate("b", 0.0, 0.0, 0.01, 0)])
    assert sel is not None and sel.leap == 0


def test_combined_distance_covers_the_majority_intersection() -> None:
    """The weighted mean moves away from the tightest truechimer; its distance must still
    reach both ends of where the truechimers meet (the minimum distance did not)."""
    a = Candidate("a", 0.0, 0.0, 1.0)
    b = Candidate("b", 5.0, 0.0, 10.0)
    sel = select([a, b])
    assert sel is not None and sel.selected == ("a", "b")
    lo, hi = -1.0, 1.0  # a's interval lies inside b's
    assert sel.offset - sel.distance <= lo and sel.offset + sel.distance >= hi
    assert sel.distance > 1.0
