"""Host-supplied text made safe to show: one helper for logs, status and metrics.

Everything the relay sends as free text (ERROR messages, stream close reasons, upstream and
endpoint names, HELLO fields) comes from the untrusted host. Printed as is it could forge
log lines (newlines), hide itself (terminal escapes, bidi controls) or bloat status. The
guest passes every such string through :func:`clean_text` before it is logged, put in a
note, a status field or a metric label.
"""

from __future__ import annotations

#: Default cap, in characters, of host text kept for logs and status.
DEFAULT_LIMIT = 160
_ELLIPSIS = "..."


def clean_text(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as printable text: each control, format, separator-other-than-space or lone
    surrogate character becomes ``?``, and the result is at most ``limit`` characters (cut
    ones end with ``...``). Non-strings become ``""``."""
    if not isinstance(value, str):
        return ""
    head = value[: limit + 1]  # never scan more than we keep: the input may be huge
    out = "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else "?"
                  for ch in head)
    if len(value) > limit:
        return out[: max(0, limit - len(_ELLIPSIS))] + _ELLIPSIS
    return out
