"""The one step policy: slew, step or refuse a measured jump, and why. Pure functions.

A hostile or broken host can report any time it likes; a restored snapshot, a suspend or a
long pause really does move the guest's clock. Telling them apart takes evidence, and what
counts as evidence depends on the trust mode (the table in docs/SECURITY.md, "Step policy"):

* **host mode** (no authenticated source configured): the first ``step_limit`` updates may
  step at once (boot, like chrony's ``makestep``); later a jump needs ``confirm_samples``
  agreeing samples, from two sources where several are usable, *and* a guest-side
  discontinuity (a suspend or restore the guest observed, a long silence, a relay reconnect:
  how a snapshot restore looks without a VMClock device) that happened *before* the jump was
  first seen: a reconnect cannot explain a jump the guest was already refusing.
* **authenticated mode** (NTS sources configured, even if none answers now): only
  authenticated sources can confirm, every reachable one must report the jump, with
  ``confirm_samples`` agreeing samples; never from a single sample and never from a host
  source, at start or later. The host controls the relay link, so a discontinuity it can
  cause counts for nothing here.

:func:`decide` is the rule; :func:`evidence` digests the sources' consecutive refused jumps
(the former jump guard) into its inputs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum

from guest_client.source import Source

#: A source keeps at most this many consecutive refused jumps (a long lie must not grow it).
MAX_JUMPS = 64


class StepAction(StrEnum):
    SLEW = "slew"
    STEP = "step"
    REFUSE = "refuse"


class Discontinuity(StrEnum):
    """Guest-side reasons to believe the clock itself moved (``on_discontinuity``)."""

    SUSPEND = "suspend"  # a suspend/resume or snapshot restore the guest observed (VMClock)
    RECONNECT = "reconnect"  # the relay link dropped and came back
    OUTAGE = "outage"  # no usable sample for ``outage_s``
    #: a VMClock disruption marker or generation change: the host's word (it writes the
    #: page), so it weighs exactly what a reconnect does and nothing in authenticated mode
    VMCLOCK = "vmclock disruption"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What backs a jump of ``jump_s`` (the newest sample's, or the selection's at boot)."""

    jump_s: float
    threshold_s: float
    initial: bool  # within the first step_limit updates
    authenticated_mode: bool  # authenticated sources configured (even if none answers)
    from_authenticated: bool  # the jump comes from an authenticated source / selection
    agreeing: int  # consecutive samples reporting the jump, within tolerance (0: they differ)
    confirm_samples: int
    sources_confirming: int
    sources_usable: int
    all_authenticated_confirm: bool  # every reachable authenticated source reports it
    discontinuity: Discontinuity | None
    predates_discontinuity: bool  # the jump was already being refused before it


@dataclass(frozen=True, slots=True)
class Decision:
    action: StepAction
    reason: str
    size_s: float = 0.0  # the jump to remove, for STEP


def decide(ev: Evidence) -> Decision:
    """Slew, step or refuse; see the module doc and docs/SECURITY.md for the table."""
    if abs(ev.jump_s) <= ev.threshold_s:
        return Decision(StepAction.SLEW, "within the step threshold")
    if ev.authenticated_mode:
        if not ev.from_authenticated:
            return Decision(StepAction.REFUSE, "host source: only authenticated sources may "
                            "confirm a step")
        if ev.agreeing < ev.confirm_samples:
            return Decision(StepAction.REFUSE, "awaiting agreeing authenticated samples")
        if not ev.all_authenticated_confirm:
            return Decision(StepAction.REFUSE, "not every authenticated source agrees")
        return Decision(StepAction.STEP, "confirmed by the authenticated sources", ev.jump_s)
    if ev.initial:
        return Decision(StepAction.STEP, "initial step", ev.jump_s)
    if ev.agreeing < ev.confirm_samples:
        return Decision(StepAction.REFUSE, "unconfirmed jump")
    if ev.sources_usable > 1 and ev.sources_confirming < 2:
        return Decision(StepAction.REFUSE, "only one of several sources reports it")
    if ev.discontinuity is None:
        return Decision(StepAction.REFUSE, "no guest-side discontinuity explains it")
    if ev.predates_discontinuity:
        return Decision(StepAction.REFUSE, f"jump predates the {ev.discontinuity}")
    return Decision(StepAction.STEP, f"confirmed after a {ev.discontinuity}", ev.jump_s)


def counts(name: str, auth_names: Collection[str]) -> bool:
    """Whether a source's jumps count: the authenticated ones in authenticated mode, else all."""
    return not auth_names or name in auth_names


def counted(sources: Iterable[Source], auth_names: Collection[str]) -> list[Source]:
    """The sources whose jumps count (:func:`counts`)."""
    return [s for s in sources if counts(s.config.name, auth_names)]


def agreeing_jumps(sources: Iterable[Source], tolerance_s: float) -> tuple[int, float]:
    """(number of consecutive refused jumps if they agree within ``tolerance_s``, else 0;
    their median, the jump to remove)."""
    jumps = sorted(j for s in sources for j in s.jumps)
    if not jumps:
        return 0, 0.0
    median = jumps[len(jumps) // 2]
    return (len(jumps) if jumps[-1] - jumps[0] <= tolerance_s else 0), median


def evidence(sources: Iterable[Source], auth_names: Collection[str], jump_s: float,
             from_authenticated: bool, *, threshold_s: float, initial: bool,
             confirm_samples: int, tolerance_s: float, discontinuity: Discontinuity | None,
             jump_before_discontinuity: float | None) -> Evidence:
    """Digest the sources' consecutive refused jumps (including the newest) for :func:`decide`."""
    pool = counted(sources, auth_names)
    agreeing, median = agreeing_jumps(pool, tolerance_s)
    usable = [s for s in pool if not s.disabled and s.reach]
    confirming = [s for s in pool if s.jumps]
    auth_usable = [s for s in usable if s.config.name in auth_names]
    predates = (jump_before_discontinuity is not None
                and abs(median - jump_before_discontinuity) <= tolerance_s)
    return Evidence(
        jump_s=median if agreeing else jump_s, threshold_s=threshold_s, initial=initial,
        authenticated_mode=bool(auth_names), from_authenticated=from_authenticated,
        agreeing=agreeing, confirm_samples=confirm_samples,
        sources_confirming=len(confirming), sources_usable=len(usable),
        all_authenticated_confirm=bool(auth_usable) and all(s.jumps for s in auth_usable),
        discontinuity=discontinuity, predates_discontinuity=predates)


def boot_evidence(sources: Iterable[Source], auth_names: Collection[str], offset_s: float,
                  selected: Collection[str], live: Iterable[Source], threshold_s: float,
                  confirm_samples: int, discontinuity: Discontinuity | None) -> Evidence:
    """Evidence for an initial step taken from the (trust-bounded) selection: in authenticated
    mode every reachable authenticated source must be selected, each with ``confirm_samples``
    samples behind its estimate: never a single sample."""
    live = list(live)
    chosen = [s for s in live if s.config.name in selected and s.config.name in auth_names]
    reachable = [s for s in sources
                 if s.config.name in auth_names and s.reach and not s.disabled]
    return Evidence(
        jump_s=offset_s, threshold_s=threshold_s, initial=True,
        authenticated_mode=bool(auth_names), from_authenticated=bool(chosen),
        agreeing=min((len(s.filter) for s in chosen), default=0 if auth_names else 1),
        confirm_samples=confirm_samples if auth_names else 1,
        sources_confirming=len(selected), sources_usable=len(live),
        all_authenticated_confirm=bool(chosen) and len(chosen) >= len(reachable),
        discontinuity=discontinuity, predates_discontinuity=False)


@dataclass(slots=True)
class JumpState:
    """The controller's memory between samples: the last guest-side discontinuity, the jump
    already being refused when it happened, and the jump every counted source keeps
    reporting (refused: it widens the error bound and makes the guest say so)."""

    discontinuity: Discontinuity | None = None
    jump_before: float | None = None
    disagreement_s: float = 0.0
    #: a refused jump every usable counted source reports, not yet confirmed by enough
    #: samples: the reference may really be there, so the bound covers it at once
    pending_s: float = 0.0

    @property
    def widening_s(self) -> float:
        """What refused jumps add to the error bound (the state follows only once confirmed:
        ``disagreement_s``)."""
        return max(abs(self.disagreement_s), abs(self.pending_s))

    def refused(self, ev: Evidence, counted_source: bool) -> None:
        """Remember a refused jump: confirmed (every counted source keeps saying so) or
        pending (every usable counted source says so, too few samples yet; ``counted_source``:
        it came from a source whose jumps count)."""
        if ev.agreeing >= ev.confirm_samples:
            self.disagreement_s = ev.jump_s
        elif counted_source and ev.sources_confirming >= max(ev.sources_usable, 1):
            self.pending_s = ev.jump_s

    def mark(self, kind: Discontinuity, pool: Iterable[Source], tolerance_s: float) -> None:
        n, median = agreeing_jumps(pool, tolerance_s)
        self.jump_before = median if n else None
        self.discontinuity = kind

    def settle(self, sources: Iterable[Source]) -> None:
        """A sample agreed with the clock (or the clock was stepped): start afresh."""
        for s in sources:
            s.jumps.clear()
        self.discontinuity = None
        self.jump_before = None
        self.disagreement_s = 0.0
        self.pending_s = 0.0


def operator_step(pool: Iterable[Source], tolerance_s: float,
                  estimate_s: float | None) -> Decision:
    """``timesync makestep``: the operator accepts the step the counted sources report (the
    authenticated ones alone, in authenticated mode: ``pool`` from :func:`counted`): their
    agreeing refused jump, else the remaining offset of the (trust-bounded) estimate."""
    n, median = agreeing_jumps(pool, tolerance_s)
    if n:
        return Decision(StepAction.STEP, f"operator accepted the jump {n} sample(s) report",
                        median)
    if estimate_s is None:
        return Decision(StepAction.REFUSE, "no estimate from a usable source to step to")
    return Decision(StepAction.STEP, "operator stepped the remaining offset", estimate_s)
