"""Clock discipline configuration: the tunables every discipline module reads.

The discipline itself is split one job per module (all sans-IO, no clock reads):

* ``timesyncd.fit``: weighted regression over a source's samples, the window sized by
  ``timesyncd.fit_window`` (a span cap from the measured noise and the wander, then a runs
  test on the residuals, chrony-like), and the samples' error bounds narrowing the offset.
* ``timesyncd.correction``: ``CorrectionModel``, the exact record of the corrections applied
  (frequency x time, and steps). Subtracting them gives the *uncorrected* time scale, in which
  a source's samples lie on a straight line whose slope is the native rate error, so stored
  samples never need rewriting after a slew or step.
* ``timesyncd.slew``: the slew plan removing a phase offset by a bounded frequency change.
* ``timesyncd.poll``: adaptive poll interval of one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DisciplineConfig:
    """Tunables of the guest clock discipline (defaults suit a vsock relay to a LAN source)."""

    minpoll: int = field(default=2, metadata={
        "help": "shortest poll interval, log2 seconds", "min": -2, "max": 17})
    maxpoll: int = field(default=5, metadata={
        "help": "longest poll interval, log2 seconds", "min": -2, "max": 17})
    burst: int = field(default=4, metadata={
        "help": "requests sent 2 s apart at start and after a reconnect", "min": 0, "max": 16})
    step_threshold_s: float = field(default=1.0, metadata={
        "help": "offsets larger than this are stepped (first step_limit updates only)",
        "min": 0.0})
    step_limit: int = field(default=3, metadata={
        "help": "number of initial clock updates during which stepping is allowed", "min": 0})
    max_slew_ppm: float = field(default=83_333.0, metadata={
        "help": "largest frequency change used to slew the phase, ppm", "min": 1.0,
        "max": 100_000.0})
    slew_time_s: float = field(default=1.0, metadata={
        "help": "shortest duration of a phase correction, seconds", "min": 0.001})
    max_root_distance_s: float = field(default=1.5, metadata={
        "help": "samples with a larger root distance are rejected", "min": 0.0})
    max_samples: int = field(default=128, metadata={
        "help": "regression window limit, samples per source", "min": 4, "max": 512})
    max_delay_dev_ratio: float = field(default=10.0, metadata={
        "help": ("reject samples whose excess delay exceeds this many median excess delays "
                 "(0: never); when most of the last 5 do, the path got slower and they are "
                 "kept"),
        "min": 0.0})
    jump_confirm_samples: int = field(default=3, metadata={
        "help": "consecutive agreeing samples needed to step a large jump after a "
        "discontinuity", "min": 1})
    outage_s: float = field(default=300.0, metadata={
        "help": "no usable sample for this long counts as a discontinuity (like a restored "
        "snapshot)", "min": 0.0})
    holdover_polls: int = field(default=4, metadata={
        "help": "missed poll intervals before entering holdover", "min": 1})
    holdover_drift_ppm: float = field(default=1.0, metadata={
        "help": "assumed frequency uncertainty in holdover; grows the error bound", "min": 0.0})
    max_error_s: float = field(default=1.0, metadata={
        "help": "error bound at or beyond which the guest is unsynchronised", "min": 0.0})
    max_clock_error_ppm: float = field(default=10.0, metadata={
        "help": "frequency-error allowance that grows the error bound between updates, ppm "
        "(like chrony's maxclockerror); the default covers the largest frequency error "
        "measured across the simulator's scenarios (docs/BENCHMARKS.md)", "min": 0.0})
    sync_max_correction_s: float = field(default=0.01, metadata={
        "help": "synchronised only while the correction still to apply (the rest of a slew) "
        "is below this, seconds", "min": 0.0})
    leap_mode: str = field(default="kernel", metadata={
        "help": "pass the sources' leap warning to the kernel, or ignore it (smearing "
        "upstreams)", "choices": ("kernel", "ignore")})

    def __post_init__(self) -> None:
        if self.minpoll > self.maxpoll:
            raise ValueError("minpoll: larger than maxpoll; lower minpoll or raise maxpoll")
        if self.leap_mode not in ("kernel", "ignore"):
            raise ValueError("leap_mode: must be 'kernel' or 'ignore'")
