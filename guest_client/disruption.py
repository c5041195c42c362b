"""Disruptions: a VMClock marker or VM generation change, or a restore detected without one.
Sans-IO: times are supplied by the driver (monotonic seconds), nothing is read here.

:class:`VmClockWatch` turns successive :class:`~guest_client.vmclock.VmClockSnapshot` reads
into at most one :class:`Disruption` per ``min_interval_s``: the hypervisor writes the page,
so on Firecracker the marker is the host's word and weighs no more than a relay reconnect. A
host flipping it in a loop must neither keep the guest disrupted nor force NTS-KE in a loop:
changes inside the interval are counted (``rate_limited``) and acted on once, at the first
read after the interval, if the page still differs from what was last acted on (deferred,
never dropped: a genuine restore inside a storm still resets the NTS state).

:class:`DisruptionState` is the controller's memory of the disrupted state (see
``GuestController.on_disruption``): set at once on a disruption, cleared by the first sample
that agrees with the clock or by a step the step policy allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guest_client.vmclock import VmClockSnapshot

#: Causes, as status and health reports name them.
VMCLOCK_MARKER = "vmclock_marker"  # the disruption marker changed (migration, restore)
VM_GENERATION = "vm_generation"  # the VM generation counter changed (restore or clone)
RESTORE_DETECTED = "restore_detected"  # no VMClock: link reset + a large consistent offset


@dataclass(frozen=True, slots=True)
class Disruption:
    """Act on this: the clock may have moved; ``clone`` also asks for fresh NTS state."""

    cause: str
    clone: bool  # the generation changed (or a restore was detected): secrets are shared


@dataclass(slots=True)
class VmClockWatch:
    """Compares VMClock reads with the last values acted on; rate-limits the resets."""

    min_interval_s: float = 60.0
    marker: int | None = None
    generation: int | None = None
    last_reset_t: float | None = None
    changes: int = 0  # reads that differed from the last one seen
    resets: int = 0  # disruptions returned
    rate_limited: int = 0  # changes seen inside the interval (acted on later, once)
    _seen: tuple[int, int | None] | None = None

    def observe(self, t: float, snap: VmClockSnapshot) -> Disruption | None:
        """The disruption to act on now, if any (the first read only sets the baseline)."""
        values = (snap.disruption_marker, snap.vm_generation)
        if self._seen is None:
            self._seen = values
            self.marker, self.generation = values
            return None
        if values != self._seen:
            self.changes += 1
            self._seen = values
            if self.last_reset_t is not None and t - self.last_reset_t < self.min_interval_s:
                self.rate_limited += 1
        if values == (self.marker, self.generation):
            return None
        if self.last_reset_t is not None and t - self.last_reset_t < self.min_interval_s:
            return None  # deferred: the next read after the interval acts
        gen_changed = snap.vm_generation != self.generation
        self.marker, self.generation = values
        self.last_reset_t = t
        self.resets += 1
        return Disruption(VM_GENERATION if gen_changed else VMCLOCK_MARKER, clone=gen_changed)

    def status(self) -> dict[str, int | float | None]:
        return {"changes": self.changes, "resets": self.resets,
                "rate_limited": self.rate_limited, "disruption_marker": self.marker,
                "vm_generation": self.generation}


@dataclass(slots=True)
class DisruptionState:
    """Whether the guest is disrupted now, why, and how often it was."""

    active: bool = False
    cause: str = ""
    count: int = 0
    causes: dict[str, int] = field(default_factory=dict)

    def begin(self, cause: str) -> None:
        self.active = True
        self.cause = cause
        self.count += 1
        self.causes[cause] = self.causes.get(cause, 0) + 1

    def end(self) -> None:
        self.active = False
