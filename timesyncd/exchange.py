"""One NTP client/server exchange per source, sans-IO (RFC 5905 sections 8 and 9).

The driver hands in the request time, the reply bytes and the arrival time; this module
decides whether the reply is a usable :class:`Sample` or a :class:`Rejection` with a stable
``reason`` that the caller counts. It never reads a clock or touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from timesyncd.ntptime import ntp_to_unix_ns, short_to_seconds
from timesyncd.packet import (
    ExtensionField,
    Leap,
    Mode,
    NtpPacket,
    PacketError,
    decode,
)
from timesyncd.reasons import ExchangeReason as R

#: RFC 5905 frequency tolerance (15 ppm): dispersion grows at this rate over the round trip.
PHI = 15e-6
#: Stratum at or above which a server is unsynchronised (RFC 5905 MAXSTRAT).
MAX_STRATUM = 16
_KISS_REASONS = {"RATE": R.KOD_RATE, "DENY": R.KOD_DENY, "RSTR": R.KOD_RSTR}
_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a reply was not used; ``reason`` is a stable counter key."""

    reason: str
    detail: str = ""
    kiss_code: str | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """One clock sample. Times are Unix ns: t1/t4 on the guest clock, t2/t3 on the server's."""

    t1_ns: int
    t2_ns: int
    t3_ns: int
    t4_ns: int
    offset_s: float
    delay_s: float
    path_delay_s: float
    dispersion_s: float
    root_delay_s: float
    root_dispersion_s: float
    stratum: int
    leap: int
    reference_id: bytes
    poll: int

    @property
    def root_distance_s(self) -> float:
        """Worst-case error of this sample against the server's reference (RFC 5905 lambda)."""
        return (
            self.root_delay_s / 2 + self.root_dispersion_s + self.delay_s / 2 + self.dispersion_s
        )


class ClientExchange:
    """Per-source request/reply state; sans-IO.

    Each request's transmit timestamp is a random 64-bit cookie rather than our clock reading,
    so an off-path attacker cannot forge a reply, and our time is not leaked to the network.
    The real send time ``t1`` is kept locally. Only the newest request is outstanding: a reply
    to a superseded one is an ``origin_mismatch`` (its t1 is gone).
    """

    def __init__(self, *, max_root_distance_s: float = 1.5, precision: int = -20) -> None:
        self.max_root_distance_s = max_root_distance_s
        self.precision = precision
        self._cookie: int | None = None  # outstanding request's transmit timestamp
        self._t1_ns = 0
        self._answered: int | None = None  # cookie of the last request that got its reply

    @property
    def outstanding(self) -> bool:
        """Whether a request is waiting for its reply."""
        return self._cookie is not None

    def request(
        self,
        cookie: int,
        t1_ns: int,
        poll: int = 4,
        extensions: tuple[ExtensionField, ...] = (),
    ) -> bytes:
        """Build a mode 3 request carrying ``cookie`` and remember it with ``t1_ns``."""
        if not 0 < cookie < 1 << 64:
            raise ValueError("cookie must be a non-zero 64-bit value")
        packet = NtpPacket(
            version=4, mode=Mode.CLIENT, poll=poll, precision=self.precision,
            transmit_ts=cookie, extensions=extensions,
        )
        data = packet.encode()
        self._cookie = cookie
        self._t1_ns = t1_ns
        return data

    def sent(self, t1_ns: int) -> None:
        """Record the actual send time (the driver may only learn it after ``request``)."""
        if self._cookie is not None:
            self._t1_ns = t1_ns

    def receive(
        self, data: bytes, t4_ns: int, residence_in_ns: int = 0, residence_out_ns: int = 0
    ) -> Sample | Rejection:
        """Decode and check a reply that arrived at guest time ``t4_ns``."""
        try:
            packet = decode(data)
        except PacketError as exc:
            return Rejection(f"malformed:{exc.reason}", str(exc))
        return self.receive_packet(packet, t4_ns, residence_in_ns, residence_out_ns)

    def receive_packet(
        self,
        packet: NtpPacket,
        t4_ns: int,
        residence_in_ns: int = 0,
        residence_out_ns: int = 0,
    ) -> Sample | Rejection:
        """Check an already decoded (e.g. NTS-verified) reply; see :meth:`receive`."""
        if packet.mode not in (Mode.SERVER, Mode.SYMMETRIC_PASSIVE):
            return Rejection(R.BAD_MODE, f"mode {packet.mode}")
        if self._cookie is None or packet.origin_ts != self._cookie:
            # Only a reply echoing our cookie may consume the request, so forged or stale
            # packets cannot cancel the genuine reply that is still on its way.
            if packet.origin_ts == self._answered and self._answered is not None:
                return Rejection(R.DUPLICATE, "second reply to an answered request")
            if self._cookie is None:
                return Rejection(R.UNSOLICITED, "no request outstanding")
            return Rejection(R.ORIGIN_MISMATCH, "origin timestamp is not our cookie")
        self._answered, self._cookie = self._cookie, None
        rejection = _check_header(packet)
        if rejection is not None:
            return rejection
        return self._sample(packet, t4_ns, residence_in_ns, residence_out_ns)

    def _sample(
        self, packet: NtpPacket, t4_ns: int, r_in: int, r_out: int
    ) -> Sample | Rejection:
        t1 = self._t1_ns
        # The server's timestamps are within 68 years of ours, so t1 resolves their era.
        t2 = ntp_to_unix_ns(packet.receive_ts, t1)
        t3 = ntp_to_unix_ns(packet.transmit_ts, t1)
        rho_local = 2.0**self.precision
        rho_server = 2.0**packet.precision
        delay_ns = (t4_ns - t1) - (t3 - t2)
        if delay_ns < -(rho_local + rho_server) * _NS:
            return Rejection(R.BAD_DELAY, f"round-trip delay {delay_ns} ns is negative")
        # A few ns below zero is the two clocks' resolution, not a bogus reply.
        delay_ns = max(delay_ns, 0)
        twice_offset_ns = (t1 - t2) + (t4_ns - t3)  # guest minus server, times two
        path_delay_ns = delay_ns
        if 0 <= r_in and 0 <= r_out and r_in + r_out <= delay_ns:
            # The relay's residence is time the packet was not on the network. Removing its
            # asymmetry moves the offset by at most delay/2, the error bound NTP already
            # grants any path, so a lying relay gains nothing beyond what delaying gives it.
            twice_offset_ns += r_in - r_out
            path_delay_ns = delay_ns - r_in - r_out
        sample = Sample(
            t1_ns=t1, t2_ns=t2, t3_ns=t3, t4_ns=t4_ns,
            offset_s=twice_offset_ns / (2 * _NS),
            delay_s=delay_ns / _NS,
            path_delay_s=path_delay_ns / _NS,
            dispersion_s=rho_local + rho_server + PHI * max(t4_ns - t1, 0) / _NS,
            root_delay_s=short_to_seconds(packet.root_delay),
            root_dispersion_s=short_to_seconds(packet.root_dispersion),
            stratum=packet.stratum, leap=packet.leap,
            reference_id=packet.reference_id, poll=packet.poll,
        )
        if sample.root_distance_s > self.max_root_distance_s:
            return Rejection(
                R.ROOT_DISTANCE,
                f"{sample.root_distance_s:.6f} s exceeds {self.max_root_distance_s} s",
            )
        return sample


def _check_header(packet: NtpPacket) -> Rejection | None:
    """Header tests that make a genuine reply unusable (RFC 5905 peer tests 5-7).

    Run only after the origin check, so an off-path attacker cannot silence a source with a
    forged Kiss-o'-Death (RFC 5905 section 7.4).
    """
    if packet.stratum == 0:
        # Kiss-o'-Death: the reference id carries an ASCII code telling us to back off. It comes
        # first because KoDs usually also carry LI=3, which would hide the code.
        code = packet.reference_id.rstrip(b"\0").decode("ascii", "replace")
        reason = _KISS_REASONS.get(code, R.KOD_OTHER)
        return Rejection(reason, f"kiss-o'-death {code!r}", kiss_code=code)
    if packet.stratum >= MAX_STRATUM:
        return Rejection(R.BAD_STRATUM, f"stratum {packet.stratum}")
    if packet.leap == Leap.UNSYNCHRONISED:
        return Rejection(R.UNSYNCHRONISED, "leap indicator 3 (server clock not synchronised)")
    if packet.receive_ts == 0 or packet.transmit_ts == 0:
        return Rejection(R.ZERO_TIMESTAMP, "receive or transmit timestamp is zero")
    return None
