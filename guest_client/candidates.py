"""Per-update source estimates: refit each source, build selection candidates, confine host
sources to the authenticated bound, and size the phase correction. Sans-IO helpers of
:class:`guest_client.controller.GuestController` (kept apart so it stays one job per module).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Iterable

from guest_client.error_bound import MAX_FREQ_SD
from guest_client.source import BURST_INTERVAL_S, Source
from timesyncd.discipline import DisciplineConfig
from timesyncd.exchange import PHI
from timesyncd.fit import MIN_WINDOW, PRIOR_SLOPE_SD, Estimate, fit_early, fit_filter
from timesyncd.selection import Candidate
from timesyncd.trust import OUTSIDE_AUTHENTICATED_BOUNDS, bound_by_authenticated

#: A filling window's floor is trusted (the regular fit takes over) from MIN_WINDOW samples,
#: or from EARLY_SEEN once they span EARLY_SPAN_S: at long polls waiting for 16 samples
#: (4.5 hours at 1024 s) left the early fit to follow the wander, and delay noise over such
#: spans moves the slope by ppb, not the ppm it moves it by over seconds at short polls.
EARLY_SEEN = 8
EARLY_SPAN_S = 1000.0


def refit(src: Source, x_now: float, prior_slope: float, cfg: DisciplineConfig,
          prior_sd: float = PRIOR_SLOPE_SD) -> Estimate | None:
    """Fit the source's samples (pruning stale ones) and adapt its poll interval; an unchanged
    source's last fit is carried forward to ``x_now``."""
    if src.dirty or src.estimate is None:
        src.dirty = False
        n = len(src.filter)
        # a filling window's floor is unknown: fit_early does not trust it (a window the fit
        # shortened at a long poll keeps the floor its earlier samples measured)
        est = (fit_early(src.filter.samples, x_now, prior_slope, prior_sd)
               if 2 <= n < MIN_WINDOW and _early(src)
               else fit_filter(src.filter, x_now, prior_slope))
        if est is None:
            return None
        src.filter.prune(est.used)
        src.poll.update(est, cfg.minpoll, cfg.maxpoll)
        src.estimate = est
        src.status.jitter_s = est.offset_sd
        return est
    est = src.estimate
    return Estimate(x_now, est.offset + est.slope * (x_now - est.x), est.slope,
                    est.offset_sd, est.slope_sd, est.used, est.total)


def _early(src: Source) -> bool:
    """Whether the source's path floor is still unknown (see EARLY_SEEN)."""
    seen = src.filter.seen
    if seen >= MIN_WINDOW:
        return False
    if seen < EARLY_SEEN:
        return True
    win = src.filter.window
    return win.X[-1] - win.X[win.lo] < EARLY_SPAN_S


def first_update_ready(sources: Iterable[Source], now: float, first_sample_t: float | None
                       ) -> bool:
    """Hold the first update until every armed source answered (or a burst interval passed)
    so a single falseticker cannot take the initial step."""
    pending = [s for s in sources
               if not s.disabled and s.next_poll is not None and s.last_sample is None]
    return not pending or (first_sample_t is not None
                           and now - first_sample_t >= BURST_INTERVAL_S)


def holdover_after(sources: Iterable[Source], cfg: DisciplineConfig) -> float:
    """Silence longer than this many (longest) poll intervals means holdover."""
    polls = [s.effective_poll for s in sources if not s.disabled]
    return cfg.holdover_polls * 2.0 ** (max(polls) if polls else cfg.maxpoll)


def gather(sources: Collection[Source], now: float, x_now: float, prior_slope: float,
           cfg: DisciplineConfig, prior_sd: float = PRIOR_SLOPE_SD
           ) -> tuple[list[Candidate], list[Source]]:
    """Candidates (offset +- distance at ``x_now``) of the sources with a sample younger
    than the holdover limit."""
    max_age = holdover_after(sources, cfg)
    cands: list[Candidate] = []
    live: list[Source] = []
    for src in sources:
        if src.disabled or src.last_sample is None or src.last_sample_t is None:
            continue
        if now - src.last_sample_t > max_age:
            continue
        est = refit(src, x_now, prior_slope, cfg, prior_sd)
        if est is None:
            continue
        dist = src.filter.best_distance(x_now, PHI) + 2 * est.offset_sd
        cands.append(Candidate(src.config.name, est.offset, est.slope, dist,
                               src.last_sample.leap))
        live.append(src)
    return cands, live


def trust_bound(cands: list[Candidate], live: list[Source], sources: dict[str, Source],
                auth: Collection[str], count: Callable[[str, Source], None]
                ) -> tuple[list[Candidate], list[Source]]:
    """With authenticated sources configured, host-trusted ones count only inside the
    interval the authenticated ones allow (see :mod:`timesyncd.trust`)."""
    if not auth:
        return cands, live
    bound = bound_by_authenticated(cands, auth)
    for name, reason in bound.rejected.items():
        src = sources[name]
        count(reason, src)
        src.status.selected = False
        src.status.note = ("outside the bounds of the authenticated sources"
                           if reason == OUTSIDE_AUTHENTICATED_BOUNDS
                           else "unused: no authenticated source to bound it")
    kept = {c.name for c in bound.kept}
    return list(bound.kept), [s for s in live if s.config.name in kept]


def sample_distance(src: Source, offset: float, slope: float, x_now: float,
                    last: int = 8, rate: float = PHI) -> float:
    """Distance from ``offset`` (uncorrected, at ``x_now``) that the source's own recent
    samples guarantee: each sample's truth lies within its root distance, carried to
    ``x_now`` along ``slope`` and widened at ``rate`` (the frequency tolerance plus the
    slope's own uncertainty, :func:`bound_terms`) for its age; the tightest such bound wins.

    The regression's interval alone can miss the truth right after the rate changed (a fit
    over samples from before the change lags the newest ones): this one cannot, as long as
    ``slope`` is within ``rate`` of the truth."""
    best = math.inf
    for s in itertools.islice(reversed(src.filter.samples), last):
        age = max(x_now - s.x, 0.0)
        best = min(best, abs(offset - (s.y + slope * (x_now - s.x))) + s.root_distance_s
                   + rate * age)
    return best


def _plain_check(src: Source, slope: float) -> float:
    """How far ``slope`` may be from the source's frequency by a fit that trusts no path
    floor: the distance to the samples' weighted line with each sample's error within half
    its whole delay (:func:`~timesyncd.filter.plain_weight`), plus twice that line's sd.
    Infinite without a slope (fewer than two samples, or all at one instant). O(1): the
    window keeps the prefix sums (an O(n) pass at every update cost the default week 15 %).
    """
    win = src.filter.window
    if len(win) < 2:
        return math.inf
    sq, sqx, sqy, sqxx, sqxy = win.plain_moments(win.lo)
    sxx = sqxx - sqx * sqx / sq if sq > 0 else 0.0
    if sxx <= 0:
        return math.inf
    plain = win.s0 + (sqxy - sqx * sqy / sq) / sxx
    return abs(plain - slope) + 2.0 / math.sqrt(sxx)


def freq_uncertainty(src: Source, slope: float) -> float:
    """Standard error of ``slope`` as this source's frequency (the frequency file and
    ``tracking`` report it; the bound uses :func:`bound_terms`).

    A full window's regression states it (``slope_sd``). A filling window's fit is pulled
    toward the previous frequency (``fit_early``'s ridge), so its own sd understates the
    error: a software clock 100 ppm off was estimated at 4 ppm with an sd of 29 ppm, and the
    bound fell behind the truth within a second. There, the distance to the samples' plain
    weighted line plus twice that line's sd is used instead (:func:`_plain_check`)."""
    est = src.estimate
    if est is None:
        return math.inf
    if len(src.filter) >= MIN_WINDOW:
        return est.slope_sd
    return _plain_check(src, slope)


def _bound_sd(src: Source, slope: float) -> float:
    """The larger of the fit's own slope sd and :func:`_plain_check` (the same thing for a
    filling window, whose sd :func:`freq_uncertainty` already takes from the check)."""
    est = src.estimate
    if est is None:
        return math.inf
    plain = _plain_check(src, slope)
    return plain if len(src.filter) < MIN_WINDOW else max(est.slope_sd, plain)


def bound_terms(selected: Iterable[Source], offset: float, slope: float, x_now: float
                ) -> tuple[float, float]:
    """(frequency sd, guaranteed distance) an update leaves for the error bound, from the
    selected sources.

    A full window's ``slope_sd`` holds only while the path floor is known: the fit weights
    a sample at the floor as exact. On a slow exponential path (``lan-noisy``) the smallest
    of 16 round trips was 0.9 ms above the real floor, two such samples 16 s apart carried
    the fit, and the slope was 35 ppm off for 160 s with a stated sd of 4 ppm (seed 30:
    the truth left the bound, worst 1.49x). The floor-free line
    (:func:`_plain_check`) does not depend on the floor, so the bound takes the larger of
    the two; the same figure widens the samples carried to now (:func:`sample_distance`)."""
    chosen = list(selected)
    sd = min((_bound_sd(s, slope) for s in chosen), default=math.inf)
    rate = PHI + min(sd, MAX_FREQ_SD)
    guaranteed = min((sample_distance(s, offset, slope, x_now, rate=rate) for s in chosen),
                     default=math.inf)
    return sd, guaranteed


def gain(offset: float, est_error_s: float, live: Iterable[Source]) -> float:
    """Share of ``offset`` to correct now: all of it when it is well above its uncertainty,
    less when it may be noise (the rest, if real, is corrected by later updates).

    Until a window has filled, the path floor itself is unknown: a sample's error may be
    up to half its delay, shrinking as samples accumulate."""
    sd = est_error_s
    for src in live:
        n = len(src.filter)
        floor = src.filter.delay_floor()
        if n < MIN_WINDOW and floor is not None:
            sd = max(sd, floor / (2.0 * math.sqrt(n)))
    var = offset * offset
    return var / (var + sd * sd) if var > 0 else 1.0
