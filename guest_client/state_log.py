"""Log lines for the controller's state transitions and refused jumps (the daemon's voice
for them: one line per transition, structured fields for JSON logs)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from guest_client.controller import GuestController

log = logging.getLogger("guest_client.daemon")  # operators filter on the daemon's logger


class StateLog:
    """Logs what changed in a controller since the last call."""

    def __init__(self) -> None:
        self._last_refused = 0

    def log_changes(self, controller: GuestController, now_ns: Callable[[], int]) -> None:
        """``now_ns`` is read only when there is a transition to report."""
        events = controller.drain_events()
        if events:
            st = controller.status(now_ns())
            for ev in events:
                log.log(logging.INFO if ev.new == "synchronised" else logging.WARNING,
                        "state %s -> %s (%s; offset %s, error bound %s, frequency %+.3f ppm)",
                        ev.old, ev.new, ev.reason,
                        "-" if st.offset_s is None else f"{st.offset_s:+.6f} s",
                        "-" if st.error_bound_s is None else f"{st.error_bound_s:.6f} s",
                        st.frequency_ppm,
                        extra={"event": "state_change", "transition": ev.name,
                               "from_state": str(ev.old), "to_state": str(ev.new),
                               "reason": str(ev.reason), "offset_s": st.offset_s,
                               "error_bound_s": st.error_bound_s,
                               "frequency_ppm": st.frequency_ppm})
        refused = controller.refused_jumps
        if refused > self._last_refused:
            log.warning("refused a time jump reported by the sources (%d refused so far); "
                        "a source or the relay may be wrong or lying", refused)
            self._last_refused = refused
