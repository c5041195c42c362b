"""NTS extension fields for NTPv4 (RFC 8915 section 5): authenticated requests and replies.

A request carries a fresh Unique Identifier, one unused cookie, enough Cookie Placeholders to
bring the jar back to its target, and an Authenticator: AES-SIV over the packet before it
(associated data) with an empty plaintext. The server's reply echoes the Unique Identifier and
returns fresh cookies *encrypted* in its Authenticator, so only we can use them (unlinkability).
Sans-IO: randomness comes from the caller, nothing reads a clock or a socket.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from timesyncd.exchange import Rejection
from timesyncd.nts.ke import AEAD_AES_SIV_CMAC_256
from timesyncd.packet import (
    HEADER_LEN,
    MAX_PACKET_LEN,
    ExtensionField,
    ExtType,
    NtpPacket,
    PacketError,
    decode,
    decode_authenticator_body,
    encode_authenticator_body,
)

#: Kiss code of an NTS NAK: the server could not use our cookie (RFC 8915 section 5.7).
NTS_NAK_CODE = b"NTSN"
UID_LEN = 32
NONCE_LEN = 16
SIV_TAG_LEN = 16
DEFAULT_COOKIE_TARGET = 8
_EF_HEADER = struct.Struct("!HH")

#: ``random_bytes(n)`` returns n unpredictable bytes (e.g. ``os.urandom`` in production).
RandomBytes = Callable[[int], bytes]


#: NTS rejections are ordinary exchange rejections, so the controller counts them in one place.
NtsRejection = Rejection


class NtsError(RuntimeError):
    """A request cannot be built (``reason`` ``"nts_no_cookies"``): run NTS-KE again."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_fields(data: bytes) -> tuple[ExtensionField, ...]:
    """Decode a run of extension fields (the plaintext inside an Authenticator), strictly."""
    fields: list[ExtensionField] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _EF_HEADER.size:
            raise PacketError("bad_encrypted_extension", "truncated field header")
        ef_type, length = _EF_HEADER.unpack_from(data, pos)
        if length < _EF_HEADER.size or length % 4 or pos + length > len(data):
            raise PacketError("bad_encrypted_extension", f"field length {length} at {pos}")
        fields.append(ExtensionField(ef_type, bytes(data[pos + 4 : pos + length])))
        pos += length
    return tuple(fields)


def seal(key: bytes, associated: bytes, nonce: bytes, plaintext: bytes = b"") -> ExtensionField:
    """The Authenticator and Encrypted Extension Fields field for ``associated`` data."""
    ciphertext = AESSIV(key).encrypt(plaintext, [associated, nonce])
    return ExtensionField(ExtType.NTS_AUTHENTICATOR, encode_authenticator_body(nonce, ciphertext))


def open_sealed(key: bytes, associated: bytes, body: bytes) -> bytes:
    """Verify and decrypt an Authenticator body; raise InvalidTag or PacketError."""
    nonce, ciphertext = decode_authenticator_body(body)
    if not nonce or len(ciphertext) < SIV_TAG_LEN:
        raise PacketError("bad_authenticator", "empty nonce or short ciphertext")
    return AESSIV(key).decrypt(ciphertext, [associated, nonce])


class NtsState:
    """Per-source NTS state: keys, the cookie jar and the one outstanding Unique Identifier."""

    def __init__(
        self,
        c2s_key: bytes,
        s2c_key: bytes,
        cookies: Iterable[bytes],
        *,
        aead_id: int = AEAD_AES_SIV_CMAC_256,
        cookie_target: int = DEFAULT_COOKIE_TARGET,
    ) -> None:
        if aead_id != AEAD_AES_SIV_CMAC_256 or len(c2s_key) != 32 or len(s2c_key) != 32:
            raise ValueError("only AEAD_AES_SIV_CMAC_256 with 32-byte keys is supported")
        self._c2s = c2s_key
        self._s2c = s2c_key
        self.cookie_target = cookie_target
        self._jar: deque[bytes] = deque(list(cookies)[-cookie_target:])
        self._uid: bytes | None = None
        #: an NTS NAK answered the outstanding request and no valid reply came since
        self.nak_received = False
        self._nak_confirmed = False  # ... and the next poll came: run NTS-KE
        #: rejected replies by reason, for status/metrics
        self.rejected: Counter[str] = Counter()

    @property
    def cookies(self) -> int:
        return len(self._jar)

    @property
    def needs_ke(self) -> bool:
        """True when no request can be sent: the jar is empty, or a NAK went unrefuted until
        the next poll (RFC 8915 section 5.7)."""
        return self._nak_confirmed or not self._jar

    def request(self, header: NtpPacket, random_bytes: RandomBytes) -> bytes:
        """Encode ``header`` (mode 3, its transmit timestamp set by the caller) with NTS fields.

        Consumes one cookie; supersedes any outstanding request. A NAK is unauthenticated (the
        host sees the Unique Identifier and can forge one), so it only counts once the next
        poll comes without a valid reply having refuted it: then the jar is dropped.
        """
        if self.nak_received:
            self._nak_confirmed = True
            self._jar.clear()
        if self.needs_ke:
            raise NtsError("nts_no_cookies", "cookie jar empty or NTS NAK: run NTS-KE")
        cookie = self._jar.popleft()
        uid = random_bytes(UID_LEN)
        nonce = random_bytes(NONCE_LEN)
        if len(uid) != UID_LEN or len(nonce) != NONCE_LEN:
            raise ValueError("random_bytes returned the wrong length")
        head = replace(header, extensions=(), mac=b"").encode()
        fields = [
            *header.extensions,
            ExtensionField(ExtType.UNIQUE_IDENTIFIER, uid),
            ExtensionField(ExtType.NTS_COOKIE, cookie),
        ]
        body = head + b"".join(ef.encode() for ef in fields)
        placeholder = ExtensionField(ExtType.NTS_COOKIE_PLACEHOLDER, bytes(len(cookie))).encode()
        auth_len = 4 + 4 + NONCE_LEN + SIV_TAG_LEN
        for _ in range(max(0, self.cookie_target - len(self._jar) - 1)):
            if len(body) + len(placeholder) + auth_len > MAX_PACKET_LEN:
                break
            body += placeholder
        self._uid = uid
        return body + seal(self._c2s, body, nonce).encode(min_len=28)

    def verify(self, data: bytes) -> NtpPacket | NtsRejection:
        """Check a reply to the outstanding request; on success refill the jar from it."""
        result = self._verify(data)
        if isinstance(result, NtsRejection):
            self.rejected[result.reason] += 1
        return result

    def _verify(self, data: bytes) -> NtpPacket | NtsRejection:
        if self._uid is None:
            return NtsRejection("nts_unsolicited", "no request outstanding (replay?)")
        try:
            packet = decode(data)
        except PacketError as exc:
            return NtsRejection(f"malformed:{exc.reason}", str(exc))
        offset = HEADER_LEN
        auth_at: int | None = None
        auth: ExtensionField | None = None
        uids: list[bytes] = []
        for ef in packet.extensions:
            if ef.type == ExtType.NTS_AUTHENTICATOR:
                auth_at, auth = offset, ef
                break  # fields after the authenticator are unauthenticated: ignore them
            if ef.type == ExtType.UNIQUE_IDENTIFIER:
                uids.append(ef.body)
            offset += 4 + len(ef.body)
        if not uids:
            return NtsRejection("nts_missing_uid")
        if len(uids) > 1:
            return NtsRejection("malformed:duplicate_uid")
        if uids[0] != self._uid:
            return NtsRejection("nts_uid_mismatch")
        if packet.stratum == 0 and packet.reference_id == NTS_NAK_CODE:
            # Unauthenticated by design: the server could not decrypt our cookie. Only the
            # matching UID lets it count, so an off-path attacker cannot force a new NTS-KE;
            # the host can, so the request stays outstanding (a genuine reply may follow) and
            # the jar is kept until the next poll (RFC 8915 section 5.7).
            self.nak_received = True
            return NtsRejection("nts_nak", "server rejected our cookie: run NTS-KE", "NTSN")
        if auth is None or auth_at is None:
            return NtsRejection("nts_bad_auth", "no authenticator")
        try:
            plaintext = open_sealed(self._s2c, data[:auth_at], auth.body)
            fields = decode_fields(plaintext)
        except InvalidTag:
            return NtsRejection("nts_bad_auth", "authenticator does not verify")
        except PacketError as exc:
            return NtsRejection(f"malformed:{exc.reason}", str(exc))
        cookies = [ef.body for ef in fields if ef.type == ExtType.NTS_COOKIE and ef.body]
        if not cookies:
            return NtsRejection("nts_no_cookies", "authenticated reply carried no cookie")
        self._uid = None
        self.nak_received = False  # a valid reply refutes any NAK before it
        for cookie in cookies:
            if len(self._jar) < self.cookie_target:
                self._jar.append(cookie)
        return packet
