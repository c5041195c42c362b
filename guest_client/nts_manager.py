"""The daemon's NTS driver: NTS-KE through relay streams, retries, request/reply plumbing.

NTS-KE is TLS end to end between the guest and the KE server; the relay only moves the bytes
(STREAM_OPEN/DATA/CLOSE). NTP then goes through the relay's ordinary NTP_REQUEST path to the
allowlisted upstream the KE result maps to. Replies are authenticated here before the
controller sees them; failures are reported to the controller as source errors by reason.

Bootstrap (certificate dates): until the controller is synchronised the guest's clock may be
far off, so NTS-KE then tolerates only the certificate's date errors (chain and name are still
verified, see :mod:`timesyncd.nts.ke_session`). Once synchronised, every source whose
certificate dates went unchecked does NTS-KE again with dates checked against the
*disciplined guest clock* (never the host's); if the server completes the handshake with a
certificate not valid then, the source is disabled (a peer that cannot finish it is not the
server: see below).
Later key exchanges (cookies used up, NTS NAK) always check dates.

What the host can force (it carries every byte): a forged NTS NAK, or dropped replies, makes
the guest run NTS-KE again; and it can answer that KE as the TLS server with any certificate
it has seen. Hence:

* Certificate date errors are judged only after the peer proved its key
  (:mod:`timesyncd.nts.ke_session`). Only a proven one (the server itself is misconfigured)
  disables a source; ``peer_unproven`` (someone in the path) is retried with backoff. The
  two are counted apart and named in the source's note, so an operator can tell them apart.
* The KE backoff is kept until :data:`KE_RESET_REPLIES` verified replies have arrived, so a
  host alternating forged NAKs and genuine replies cannot reset it every second poll.
* A server that rotated its keys without a NAK (or a host dropping the NAKs) leaves requests
  unanswered: after :data:`ROTATION_UNANSWERED` in a row with cookies left, NTS-KE runs again,
  at most once per backoff step.
* Replies whose server time is before the time floor are refused (``before_time_floor``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from guest_client.nts_source import NtsServerSpec, NtsSource
from guest_client.relay_link import RelayFailure, RelayLink, RelayReply
from timesyncd import framing
from timesyncd.aio import cancel_task
from timesyncd.clock import Clock
from timesyncd.framing import ErrorCode, Frame, FrameType
from timesyncd.ntptime import ntp_to_unix_ns
from timesyncd.nts.ke import KeError
from timesyncd.packet import NtpPacket
from timesyncd.text import clean_text
from timesyncd.time_floor import TimeFloor

if TYPE_CHECKING:  # the NTS modules load cryptography and pyOpenSSL (~15 MiB): only when used
    from timesyncd.nts.ke_session import NtsKeResult, NtsKeSession
    from timesyncd.nts.ntp import RandomBytes

log = logging.getLogger(__name__)

#: KE failures judged after the peer proved its key: the server is misconfigured
_PROVEN_ERRORS = ("cert_expired", "cert_not_yet_valid", "cert_expired_before_floor")
#: Verified replies after a key exchange before its backoff starts over.
KE_RESET_REPLIES = 4
#: Unanswered authenticated requests in a row (cookies left) before NTS-KE runs again.
ROTATION_UNANSWERED = 4

OnReply = Callable[[str, bytes, int, int, int], None]  # source, packet, rx_ns, r_in, r_out
OnError = Callable[[str, str], None]  # source, reason
OnSent = Callable[[str, int], None]  # source, t1_ns


async def nts_ke_via_relay(link: RelayLink, endpoint: int, session: NtsKeSession,
                           timeout_s: float) -> NtsKeResult:
    """Run ``session`` over a relay byte stream to KE endpoint ``endpoint``; raise KeError."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[NtsKeResult] = loop.create_future()
    sid: int | None = None

    def on_frame(frame: Frame) -> None:
        if done.done() or sid is None:
            return
        try:
            if frame.type == FrameType.STREAM_OPEN:
                return  # the relay connected; our ClientHello is already on its way
            if frame.type == FrameType.ERROR:
                code, message = framing.parse_error(frame)
                name = ErrorCode(code).name.lower() if code in ErrorCode._value2member_map_ \
                    else str(code)
                raise session.abort(KeError(f"relay_{name}", clean_text(message)))
            if frame.type == FrameType.STREAM_DATA:
                out = session.receive_data(frame.payload)
            else:
                reason = framing.parse_stream_close(frame)
                if reason and session.result is None:
                    raise session.abort(KeError("stream_closed", clean_text(reason)))
                out = session.receive_eof()
            for f in framing.stream_data(sid, out):
                link.send_frame(f)
            if session.result is not None:
                done.set_result(session.result)
        except KeError as exc:
            done.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - a TLS library surprise must not escape
            done.set_exception(KeError("tls_failed", str(exc)))

    sid = link.open_stream(on_frame)
    if sid is None:
        raise KeError("relay_not_connected", "no relay connection for NTS-KE")
    try:
        link.send_frame(framing.stream_open(sid, endpoint))
        for f in framing.stream_data(sid, session.start()):
            link.send_frame(f)
        return await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        raise session.abort(KeError("timeout", f"no NTS-KE result in {timeout_s} s")) from None
    finally:
        link.close_stream(sid)  # no-op if the relay already ended it
        if done.done() and not done.cancelled():
            done.exception()  # retrieved: no "never retrieved" warning


class NtsManager:
    """NTS sources of one daemon; the daemon calls the ``on_*`` hooks and :meth:`send`."""

    def __init__(
        self, specs: list[NtsServerSpec], *, cafile: str | None, clock: Clock,
        is_synchronised: Callable[[], bool], on_reply: OnReply, on_error: OnError,
        on_sent: OnSent, ke_timeout_s: float = 10.0, retry_min_s: float = 2.0,
        retry_max_s: float = 600.0, random_bytes: RandomBytes = os.urandom,
        floor: TimeFloor | None = None,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self.sources = {s.source_name: NtsSource(s, random_bytes) for s in specs}
        self.cafile = cafile
        self.clock = clock
        self._synced = is_synchronised
        self._on_reply = on_reply
        self._on_error = on_error
        self._on_sent = on_sent
        self.ke_timeout_s = ke_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.link: RelayLink | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = dict.fromkeys(self.sources, 0)
        self._not_before: dict[str, float] = dict.fromkeys(self.sources, 0.0)  # monotonic s
        self._last_request: dict[str, int] = {}
        self._disabled: set[str] = set()
        self.floor = floor or TimeFloor.build()
        #: verified replies since the last key exchange (its backoff resets at KE_RESET_REPLIES)
        self._verified: dict[str, int] = dict.fromkeys(self.sources, 0)
        #: authenticated requests in a row that got no verified reply
        self._unanswered: dict[str, int] = dict.fromkeys(self.sources, 0)
        self._outstanding: set[str] = set()  # sent, not yet answered, timed out or superseded
        self._on_ready = on_ready  # a source got keys: the daemon starts polling it
        self._retries: dict[str, asyncio.TimerHandle] = {}

    def owns(self, name: str) -> bool:
        return name in self.sources

    def attach(self, link: RelayLink) -> None:
        self.link = link

    async def stop(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        # bounded, re-cancelling a swallowed cancel (a bare await could hang stop())
        await asyncio.gather(*(cancel_task(t) for t in tasks))

    # --- hooks -----------------------------------------------------------------------------

    def on_relay_up(self) -> None:
        """A (re)connected relay: keys may be fine, but run KE for sources that need it."""
        upstreams = {u.name: u.index for u in self.link.upstreams} if self.link else {}
        for src in self.sources.values():
            self._unanswered[src.name] = 0  # lost with the link: not the server's doing
            src.remap(upstreams)
            self._maybe_ke(src)

    def discard_secrets(self, reason: str) -> None:
        """A restore or clone: every copy of this guest holds the same keys and cookies, and a
        cookie must never be sent twice. Drop them all (and any KE in flight) and run NTS-KE
        again at once; the driver rate-limits how often this may happen."""
        for name, task in list(self._tasks.items()):
            task.cancel()
            del self._tasks[name]
        self._last_request.clear()
        self._outstanding.clear()
        for src in self.sources.values():
            src.discard(reason)
            self._not_before[src.name] = 0.0
            self._maybe_ke(src)

    def on_relay_down(self) -> None:
        self._last_request.clear()
        self._outstanding.clear()

    def send(self, name: str, data: bytes) -> None:
        """Send the controller's plain request ``data`` for NTS source ``name``."""
        src = self.sources[name]
        self._maybe_ke(src)
        link = self.link
        if name in self._disabled:
            self._on_error(name, "nts_disabled")
            return
        wrapped = src.wrap(data)
        if isinstance(wrapped, str):
            self._on_error(name, wrapped)
            self._maybe_ke(src)
            return
        if link is None or src.upstream is None:
            self._on_error(name, "relay_not_connected")
            return
        last = self._last_request.pop(name, None)
        if last is not None:
            link.cancel(last)
        self._unanswer(src)  # superseded without a verified reply
        rid = link.send(src.upstream, wrapped, functools.partial(self._on_result, name))
        if rid is None:  # the link's own reason: busy or oversized is not "not connected"
            self._on_error(name, link.last_refusal or "relay_not_connected")
            return
        self._last_request[name] = rid
        self._outstanding.add(name)
        self._on_sent(name, link.last_tx_ns or self.clock.now_ns())  # t1, before the write

    def status(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for name, src in self.sources.items():
            st = src.status()
            st["disabled"] = name in self._disabled
            st["ke_running"] = name in self._tasks
            st["unanswered"] = self._unanswered[name]
            st["note"] = src.note
            out[name] = st
        return out

    # --- internals -------------------------------------------------------------------------

    def _on_result(self, name: str, result: RelayReply | RelayFailure) -> None:
        src = self.sources[name]
        if isinstance(result, RelayFailure):
            if result.reason == "timeout":
                self._unanswer(src)
            if result.reason != "connection_lost":
                self._on_error(name, result.reason)
            return
        verified = src.verify(result.packet)
        if not isinstance(verified, NtpPacket):
            log.warning("NTS source %s: rejected reply (%s%s)", name, verified.reason,
                        f": {verified.detail}" if verified.detail else "")
            self._on_error(name, verified.reason)
            if src.needs_ke:
                self._maybe_ke(src)
            return
        server_ns = ntp_to_unix_ns(verified.transmit_ts, self.floor.floor_ns)
        if not self.floor.allows(server_ns):
            src.counters["before_time_floor"] += 1
            self._on_error(name, "before_time_floor")
            log.warning("NTS source %s: reply time is before the time floor %s: refused", name,
                        f"{self.floor.datetime:%Y-%m-%d}")
            return
        self._outstanding.discard(name)
        self._unanswered[name] = 0
        self._verified[name] += 1
        if self._verified[name] >= KE_RESET_REPLIES:
            # several verified replies, not one: a host alternating forged NAKs with genuine
            # replies must not reset the backoff each time
            self._failures[name] = 0
        # The relay's residence times are the untrusted host's word: a correction by them could
        # move the offset by up to delay/2 *beyond* the raw measurement, doubling what a
        # delaying host achieves while the bound (delay/2) claims otherwise. Ignore them.
        self._on_reply(name, result.packet, result.rx_ns, 0, 0)
        self._maybe_ke(src)  # validity re-check once synchronised

    def _unanswer(self, src: NtsSource) -> None:
        """The outstanding request got no verified reply (timed out or superseded): after
        ROTATION_UNANSWERED in a row with cookies left, the server may have new keys."""
        name = src.name
        if name not in self._outstanding:
            return
        self._outstanding.discard(name)
        self._unanswered[name] += 1
        if self._unanswered[name] >= ROTATION_UNANSWERED and src.ready:
            self._maybe_ke(src, rotate=True)

    def _maybe_ke(self, src: NtsSource, rotate: bool = False) -> None:
        name = src.name
        link = self.link
        if name in self._disabled or name in self._tasks or link is None or not link.connected:
            return
        recheck = src.validity_unchecked and src.ready and self._synced()
        if not (src.needs_ke or recheck or rotate):
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._not_before[name]:
            return
        self._tasks[name] = loop.create_task(self._key_exchange(src, link), name=f"nts-ke {name}")

    async def _key_exchange(self, src: NtsSource, link: RelayLink) -> None:
        name = src.name
        loop = asyncio.get_running_loop()
        failures = self._failures[name]
        # every KE counts until a verified reply resets it: forged NAKs cannot force a KE storm
        self._failures[name] = failures + 1
        self._not_before[name] = loop.time() + min(self.retry_max_s,
                                                   self.retry_min_s * 2.0 ** min(failures, 20))
        self._verified[name] = 0
        trusted = self._synced()
        try:
            endpoint = self._ke_index(src, link)
            if endpoint is None:
                return
            from timesyncd.nts.ke_session import NtsKeSession

            session = NtsKeSession(src.spec.tls_name, cafile=self.cafile, time_trusted=trusted,
                                   verify_time=self.floor.verify_time(self.clock.now_ns()),
                                   floor=self.floor.datetime)
            result = await nts_ke_via_relay(link, endpoint, session, self.ke_timeout_s)
        except KeError as exc:
            src.on_ke_error(exc.reason, exc.detail)
            self._on_error(name, f"nts_ke_{exc.reason}")
            if exc.reason in _PROVEN_ERRORS and (trusted or exc.reason.endswith("_floor")):
                # the peer proved its key: the server itself serves a bad certificate
                self._disabled.add(name)
                src.state = None
                src.counters["ke_server_misconfigured"] += 1
                when = "time floor" if exc.reason.endswith("_floor") else "synchronised time"
                src.note = (f"server misconfigured: certificate not valid at the {when} "
                            f"({exc.reason}), proven by a completed TLS handshake: source "
                            "disabled")
            elif exc.reason == "peer_unproven":
                src.counters["ke_path_suspect"] += 1
                src.note = (f"someone in the path? {clean_text(exc.detail)}; retrying with "
                            "backoff")
            log.warning("NTS-KE for %s failed: %s", name, src.note)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a CA file OpenSSL cannot load
            # a dead task would leave the source "NTS-KE pending" forever with nothing counted;
            # this is a KE failure like any other, retried with the same backoff
            src.on_ke_error("error", f"{type(exc).__name__}: {exc}")
            self._on_error(name, "nts_ke_error")
            log.warning("NTS-KE for %s failed unexpectedly: %s", name, src.note, exc_info=exc)
            return
        finally:
            if self._tasks.get(name) is asyncio.current_task():  # not a KE started after us
                del self._tasks[name]
            if not src.ready:
                self._retry_later(src)  # after the backoff; cancelled below if this succeeds
        upstreams = {u.name: u.index for u in link.upstreams}
        self._unanswered[name] = 0
        if src.on_ke_result(result, upstreams):
            retry = self._retries.pop(name, None)
            if retry is not None:
                retry.cancel()
            if self._on_ready is not None:
                self._on_ready(name)
            log.info("NTS-KE for %s done: %d cookies, NTP via relay upstream %d (%s)%s", name,
                     len(result.cookies), src.upstream, src.ntp_server,
                     "; certificate dates unchecked" if result.validity_unchecked else "")
        else:
            self._on_error(name, "ntp_server_not_allowlisted")
            log.error("NTS source %s: %s", name, src.note)

    def _retry_later(self, src: NtsSource) -> None:
        """Retry a failed KE after its backoff even if nothing polls the source (it is parked
        until it has keys)."""
        if src.name in self._disabled or src.name in self._retries:
            return
        loop = asyncio.get_running_loop()

        def retry() -> None:
            self._retries.pop(src.name, None)
            self._maybe_ke(src)

        delay = max(self._not_before[src.name] - loop.time(), 0.0) + 0.01
        self._retries[src.name] = loop.call_later(delay, retry)

    def _ke_index(self, src: NtsSource, link: RelayLink) -> int | None:
        entries = link.hello_info.get("nts_ke")
        offered: dict[str, int] = {}
        if isinstance(entries, list):
            for e in entries:
                if (isinstance(e, dict) and isinstance(e.get("name"), str)
                        and isinstance(e.get("index"), int) and 0 <= e["index"] <= 255):
                    offered[clean_text(e["name"])] = e["index"]
        index = offered.get(src.spec.ke_endpoint)
        if index is None:
            src.counters["ke_endpoint_not_offered"] += 1
            src.note = (f"relay does not offer NTS-KE endpoint {src.spec.ke_endpoint} (it offers "
                        f"{sorted(offered) or 'none'}); add it to the relay's nts_ke_servers")
            self._on_error(src.name, "nts_ke_endpoint_not_offered")
            log.error("NTS source %s: %s", src.name, src.note)
        return index
