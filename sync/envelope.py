"""Envelopes: one sealed batch, the same bytes over HTTP or on a USB stick.

Wire format (all integers big-endian)::

    b"FRGE" | format 0x01 | u32 header length | header | u32 ciphertext length
    | ciphertext | 64-byte Ed25519 signature

The header is canonical JSON, readable by anyone. The body is compressed with
zstd, then encrypted with HPKE (RFC 9180) to the recipient with the header
bound as `info`. The sender signs the domain-separated, length-prefixed header
and ciphertext. Every failure to open is one `EnvelopeError` with a stable code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import zstandard
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke

from sync.keys import KemAlgorithm, KeyPairs, PublicKeys

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_TEXT_CHARS",
    "PROTOCOL_VERSION",
    "EnvelopeError",
    "EnvelopeErrorCode",
    "Header",
    "Opened",
    "open_sealed",
    "read_header_unverified",
    "seal",
]

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_TEXT_CHARS = 128
_MAX_INT = 2**63 - 1  # fits a signed 64-bit SQL column

_MAGIC = b"FRGE"
_FORMAT = 1
_DOMAIN = b"fieldreg/envelope/v1\x00"
_SIGNATURE_BYTES = 64
_AEAD_TAG_BYTES = 16
_U32 = struct.Struct(">I")
_PREFIX_BYTES = len(_MAGIC) + 1 + _U32.size
_HPKE_KEMS = {
    KemAlgorithm.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519,
    KemAlgorithm.X25519: hpke.KEM.X25519,
}

EnvelopeErrorCode = Literal[
    "envelope.malformed",
    "envelope.bad_signature",
    "envelope.undecryptable",
    "protocol.unsupported",
]


class EnvelopeError(Exception):
    """An envelope that cannot be read, trusted or opened.

    `code` is stable and dotted (see `EnvelopeErrorCode`); `detail` is a
    sentence for people. Neither ever contains key material or plaintext.
    """

    def __init__(self, code: EnvelopeErrorCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: EnvelopeErrorCode = code
        self.detail = detail


def _malformed(detail: str) -> EnvelopeError:
    return EnvelopeError("envelope.malformed", detail)


@dataclass(frozen=True)
class Header:
    """The clear part of an envelope. Construction checks every field (ValueError)."""

    protocol: int
    schema_version: int
    kind: str
    sender: str
    recipient: str
    batch_id: str
    seq_first: int
    seq_last: int
    sent_at_ms: int
    kem: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if type(value) is not int or not 0 <= value <= _MAX_INT:
                    raise ValueError(f"{f.name}: expected an integer from 0 to 2**63-1")
            elif not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT_CHARS:
                raise ValueError(f"{f.name}: expected text of 1 to {MAX_TEXT_CHARS} characters")
            elif any("\ud800" <= char <= "\udfff" for char in value):
                raise ValueError(f"{f.name}: text has unpaired surrogates")
            elif any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
                # Ids and batch names are stored and logged; no database takes U+0000.
                raise ValueError(f"{f.name}: text has control characters")
        known = sorted(k.value for k in KemAlgorithm)
        if self.kem not in known:
            raise ValueError(f"kem: expected one of {known}")
        object.__setattr__(self, "kem", KemAlgorithm(self.kem).value)
        if self.seq_first > self.seq_last:
            raise ValueError("seq_first: greater than seq_last")

    def to_bytes(self) -> bytes:
        """Return canonical JSON: sorted keys, no spaces, UTF-8."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        """Parse a header strictly; raise `EnvelopeError` on anything but canonical form.

        Code "protocol.unsupported" for another protocol version, else
        "envelope.malformed". Says nothing about authenticity.
        """
        if len(data) > MAX_HEADER_BYTES:
            raise _malformed("header is too long")
        try:
            # Duplicate keys, floats and NaN need no hook: the field type checks
            # and the canonical re-encoding below refuse them.
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _malformed("header is not valid UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise _malformed("header is not a JSON object")
        protocol = obj.get("protocol")
        if type(protocol) is int and protocol != PROTOCOL_VERSION:
            raise EnvelopeError("protocol.unsupported", f"protocol {protocol} is not supported")
        names = {f.name for f in fields(cls)}
        if missing := sorted(names - set(obj)):
            raise _malformed(f"header is missing field(s) {', '.join(missing)}")
        if unknown := len(set(obj) - names):
            raise _malformed(f"header has {unknown} unknown field(s)")
        try:
            header = cls(**obj)
        except ValueError as exc:
            raise _malformed(f"header {exc}") from None
        if header.to_bytes() != data:
            raise _malformed("header is not canonical JSON")
        return header


@dataclass(frozen=True)
class Opened:
    """A verified, decrypted envelope. `body_sha256` is the hex digest of `body`."""

    header: Header
    body: bytes = field(repr=False)
    body_sha256: str


def _signed_message(header_bytes: bytes, ciphertext: bytes) -> bytes:
    return _DOMAIN + _U32.pack(len(header_bytes)) + header_bytes + ciphertext


def _suite(kem: KemAlgorithm) -> hpke.Suite:
    return hpke.Suite(_HPKE_KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def seal(
    header: Header, body: bytes, *, recipient: PublicKeys, sender: KeyPairs, level: int = 3
) -> bytes:
    """Return the envelope bytes: compress `body`, encrypt to `recipient`, sign as `sender`.

    Raises ValueError if `header.kem` is not the recipient's KEM, the protocol
    is not `PROTOCOL_VERSION`, or the result would exceed the size limits.
    Does not check that `header.sender` names `sender`, nor replay: the hub
    deduplicates by batch id and body digest.
    """
    if header.protocol != PROTOCOL_VERSION:
        raise ValueError(f"header.protocol must be {PROTOCOL_VERSION}")
    if header.kem != recipient.kem_algorithm:
        raise ValueError("header.kem does not match the recipient's KEM algorithm")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError("body is larger than MAX_BODY_BYTES")
    header_bytes = header.to_bytes()
    compressed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    ciphertext = _suite(recipient.kem_algorithm).encrypt(
        compressed, recipient.kem_public_key(), info=_DOMAIN + header_bytes
    )
    signature = sender.signing.sign(_signed_message(header_bytes, ciphertext))
    envelope = _MAGIC + bytes([_FORMAT]) + _U32.pack(len(header_bytes)) + header_bytes
    envelope += _U32.pack(len(ciphertext)) + ciphertext + signature
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise ValueError("envelope would be larger than MAX_ENVELOPE_BYTES")
    return envelope


def _parse(data: bytes) -> tuple[bytes, Header, bytes, bytes]:
    """Return header bytes, header, ciphertext and signature; check framing only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("envelope data must be bytes")
    data = bytes(data)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise _malformed("envelope is too long")
    if len(data) < _PREFIX_BYTES or data[:4] != _MAGIC:
        raise _malformed("not a fieldreg envelope")
    if data[4] != _FORMAT:
        raise EnvelopeError("protocol.unsupported", f"envelope format {data[4]} is not supported")
    (header_len,) = _U32.unpack_from(data, 5)
    if header_len > MAX_HEADER_BYTES:
        raise _malformed("header length is over the limit")
    header_end = _PREFIX_BYTES + header_len
    if len(data) < header_end + _U32.size:
        raise _malformed("envelope is truncated")
    header_bytes = data[_PREFIX_BYTES:header_end]
    (ciphertext_len,) = _U32.unpack_from(data, header_end)
    ciphertext_start = header_end + _U32.size
    ciphertext_end = ciphertext_start + ciphertext_len
    if len(data) != ciphertext_end + _SIGNATURE_BYTES:
        raise _malformed("envelope length does not match its framing")
    ciphertext, signature = data[ciphertext_start:ciphertext_end], data[ciphertext_end:]
    return header_bytes, Header.from_bytes(header_bytes), ciphertext, signature


def read_header_unverified(data: bytes) -> Header:
    """Return the header of an envelope after checking its framing only.

    UNVERIFIED: nothing is authenticated yet. Use it to find the sender's keys,
    then call `open_sealed`. Raises `EnvelopeError` ("envelope.malformed" or
    "protocol.unsupported").
    """
    return _parse(data)[1]


def open_sealed(
    data: bytes, *, sender: PublicKeys, recipient: KeyPairs, max_body_bytes: int = MAX_BODY_BYTES
) -> Opened:
    """Return the verified header and decrypted body of an envelope.

    Order: parse, verify the signature against `sender` ("envelope.bad_signature"),
    decrypt with `recipient` ("envelope.undecryptable"), decompress to at most
    `max_body_bytes` ("envelope.malformed"). Does not check that
    `header.sender` is the party whose keys were given, nor `header.recipient`,
    time or replay: the caller (the hub) does.
    """
    header_bytes, header, ciphertext, signature = _parse(data)
    try:
        sender.signing_public_key().verify(signature, _signed_message(header_bytes, ciphertext))
    except InvalidSignature:
        raise EnvelopeError("envelope.bad_signature", "signature does not verify") from None
    kem = KemAlgorithm(header.kem)
    if kem is not recipient.kem_algorithm:
        raise EnvelopeError("envelope.undecryptable", "header KEM is not the recipient's")
    if len(ciphertext) < _HPKE_KEMS[kem].enc_length() + _AEAD_TAG_BYTES:
        raise EnvelopeError("envelope.undecryptable", "ciphertext is too short")
    try:
        compressed = _suite(kem).decrypt(
            ciphertext, recipient.kem_private_key(), info=_DOMAIN + header_bytes
        )
    except (InvalidTag, ValueError):  # ValueError: a KEM share the key cannot use
        raise EnvelopeError("envelope.undecryptable", "ciphertext does not decrypt") from None
    body = _decompress(compressed, max_body_bytes)
    return Opened(header=header, body=body, body_sha256=hashlib.sha256(body).hexdigest())


def _decompress(frame: bytes, max_body_bytes: int) -> bytes:
    # zstandard's one-shot decompress allocates the size the frame declares,
    # ignoring max_output_size, so the declaration is checked first. For a
    # declared 0 it returns b"" unread, so that case is streamed instead.
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise _malformed("body is not a zstd frame") from None
    if declared < 0:
        raise _malformed("body frame does not declare its size")
    if declared > max_body_bytes:
        raise _malformed("body is larger than the limit")
    dctx = zstandard.ZstdDecompressor()
    try:
        if declared == 0:
            stream = dctx.decompressobj()
            body = stream.decompress(frame)
            is_complete = stream.eof and not stream.unused_data
        else:
            body = dctx.decompress(frame, max_output_size=declared, allow_extra_data=False)
            is_complete = True
    except zstandard.ZstdError:
        raise _malformed("body is not valid zstd") from None
    if not is_complete or len(body) != declared:
        raise _malformed("body frame is incomplete")
    return body
