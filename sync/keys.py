"""The key pairs of a device or the hub: Ed25519 to sign, a KEM to receive.

`KeyPairs` is the private side and never leaves the machine that made it;
`PublicKeys` is what enrolment exchanges and pins. The KEM is the hybrid
ML-KEM-768 + X25519 by default (records of people in crisis stay sensitive
for decades), and every key pair fieldreg makes is hybrid; plain X25519 is
read too: a public key names its KEM, and a sender seals to the recipient's.

cryptography's hybrid `hpke.MLKEM768X25519PrivateKey` and `...PublicKey` can
neither be serialised nor taken apart, so this module keeps the two halves
and builds the hybrid objects on demand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

__all__ = [
    "KemAlgorithm",
    "KemPrivateKey",
    "KemPublicKey",
    "KeyFormatError",
    "KeyPairs",
    "PublicKeys",
]

_MLKEM_PUBLIC_BYTES = 1184
_MLKEM_SEED_BYTES = 64
_RAW_KEY_BYTES = 32  # Ed25519 and X25519, public and private alike
_FINGERPRINT_DOMAIN = b"fieldreg/public-keys/v1\x00"
_PRIVATE_MAGIC = b"FRKP"
_PRIVATE_VERSION = 1


class KemAlgorithm(StrEnum):
    """The key encapsulation mechanism a party receives envelopes with."""

    MLKEM768_X25519 = "mlkem768-x25519"
    X25519 = "x25519"


_KEM_PUBLIC_BYTES = {
    KemAlgorithm.MLKEM768_X25519: _MLKEM_PUBLIC_BYTES + _RAW_KEY_BYTES,
    KemAlgorithm.X25519: _RAW_KEY_BYTES,
}
# One byte naming the algorithm inside the private-key serialisation.
_KEM_CODES = {KemAlgorithm.MLKEM768_X25519: 1, KemAlgorithm.X25519: 2}

KemPublicKey = hpke.MLKEM768X25519PublicKey | x25519.X25519PublicKey
KemPrivateKey = hpke.MLKEM768X25519PrivateKey | x25519.X25519PrivateKey


class KeyFormatError(ValueError):
    """Key material that cannot be read: wrong shape, length or algorithm."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(name: str, text: object) -> bytes:
    if not isinstance(text, str) or not text.isascii() or "=" in text:
        raise KeyFormatError(f"{name}: expected unpadded base64url text")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{name}: not valid base64url") from None
    if _b64encode(raw) != text:  # refuse non-canonical spellings of the same bytes
        raise KeyFormatError(f"{name}: not canonical base64url")
    return raw


def _parse_algorithm(value: object) -> KemAlgorithm:
    if not isinstance(value, str):
        raise KeyFormatError("kem_algorithm: expected a string")
    try:
        return KemAlgorithm(value)
    except ValueError:
        raise KeyFormatError("kem_algorithm: unknown algorithm") from None


def _check_x25519_public(raw: bytes) -> x25519.X25519PublicKey:
    key = x25519.X25519PublicKey.from_public_bytes(raw)
    try:
        # A low-order point makes every shared secret zero; cryptography accepts
        # such a key and only fails later, inside encryption.
        x25519.X25519PrivateKey.generate().exchange(key)
    except ValueError:
        raise KeyFormatError("kem: X25519 public key is a low-order point") from None
    return key


@dataclass(frozen=True)
class PublicKeys:
    """A party's public keys: raw Ed25519 `signing`, raw `kem`, `kem_algorithm`.

    For the hybrid KEM, `kem` is the ML-KEM-768 public key (1,184 bytes)
    followed by the X25519 one (32 bytes). Construction checks lengths and
    that the KEM key parses, raising `KeyFormatError`.
    """

    signing: bytes
    kem: bytes
    kem_algorithm: KemAlgorithm

    def __post_init__(self) -> None:
        object.__setattr__(self, "kem_algorithm", _parse_algorithm(self.kem_algorithm))
        if not isinstance(self.signing, bytes) or len(self.signing) != _RAW_KEY_BYTES:
            raise KeyFormatError(f"signing: expected {_RAW_KEY_BYTES} bytes")
        expected = _KEM_PUBLIC_BYTES[self.kem_algorithm]
        if not isinstance(self.kem, bytes) or len(self.kem) != expected:
            raise KeyFormatError(f"kem: expected {expected} bytes for {self.kem_algorithm}")
        try:
            self.kem_public_key()
        except KeyFormatError:
            raise
        except ValueError:
            raise KeyFormatError("kem: not a valid ML-KEM-768 public key") from None

    def kem_public_key(self) -> KemPublicKey:
        """Return the cryptography KEM public key object to encrypt to."""
        if self.kem_algorithm is KemAlgorithm.X25519:
            return _check_x25519_public(self.kem)
        mlkem_pub = mlkem.MLKEM768PublicKey.from_public_bytes(self.kem[:_MLKEM_PUBLIC_BYTES])
        x_pub = _check_x25519_public(self.kem[_MLKEM_PUBLIC_BYTES:])
        return hpke.MLKEM768X25519PublicKey(mlkem_pub, x_pub)

    def signing_public_key(self) -> ed25519.Ed25519PublicKey:
        """Return the Ed25519 public key that verifies this party's signatures."""
        return ed25519.Ed25519PublicKey.from_public_bytes(self.signing)

    def to_json(self) -> dict[str, str]:
        """Return a JSON-ready dict; keys are unpadded base64url."""
        return {
            "kem": _b64encode(self.kem),
            "kem_algorithm": self.kem_algorithm.value,
            "signing": _b64encode(self.signing),
        }

    @classmethod
    def from_json(cls, data: object) -> PublicKeys:
        """Parse the output of `to_json`; raise `KeyFormatError` on anything else.

        The key set must be exact: an unknown field is refused, not ignored.
        """
        if not isinstance(data, dict):
            raise KeyFormatError("public keys: expected a JSON object")
        expected = {"kem", "kem_algorithm", "signing"}
        if missing := sorted(expected - set(data)):
            raise KeyFormatError(f"public keys: missing field(s) {', '.join(missing)}")
        if unknown := len(set(data) - expected):
            raise KeyFormatError(f"public keys: {unknown} unknown field(s)")
        return cls(
            signing=_b64decode("signing", data["signing"]),
            kem=_b64decode("kem", data["kem"]),
            kem_algorithm=_parse_algorithm(data["kem_algorithm"]),
        )

    def fingerprint(self) -> str:
        """Return 20 bytes of SHA-256 over all three fields, as hex for reading aloud.

        The form is ten upper-case groups of four hex digits: "1A2B 3C4D ...".
        """
        digest = hashlib.sha256(_FINGERPRINT_DOMAIN)
        for part in (self.kem_algorithm.value.encode("ascii"), self.signing, self.kem):
            digest.update(struct.pack(">I", len(part)) + part)
        hex_digits = digest.digest()[:20].hex().upper()
        return " ".join(hex_digits[i : i + 4] for i in range(0, len(hex_digits), 4))


@dataclass(frozen=True, eq=False, repr=False)
class KeyPairs:
    """A party's private keys: Ed25519 `signing`, and the KEM halves.

    `kem_mlkem` is present exactly when `kem_algorithm` is the hybrid. The
    repr shows the public fingerprint only, never key material.
    """

    signing: ed25519.Ed25519PrivateKey
    kem_x25519: x25519.X25519PrivateKey
    kem_mlkem: mlkem.MLKEM768PrivateKey | None
    kem_algorithm: KemAlgorithm

    def __post_init__(self) -> None:
        object.__setattr__(self, "kem_algorithm", KemAlgorithm(self.kem_algorithm))
        is_hybrid = self.kem_algorithm is KemAlgorithm.MLKEM768_X25519
        if is_hybrid != (self.kem_mlkem is not None):
            raise ValueError("kem_mlkem must be given exactly for the hybrid KEM")

    def __repr__(self) -> str:
        return f"KeyPairs({self.kem_algorithm.value}, fingerprint={self.public().fingerprint()!r})"

    @classmethod
    def generate(cls, kem_algorithm: KemAlgorithm = KemAlgorithm.MLKEM768_X25519) -> KeyPairs:
        """Return fresh random key pairs for `kem_algorithm`."""
        algorithm = KemAlgorithm(kem_algorithm)
        return cls(
            signing=ed25519.Ed25519PrivateKey.generate(),
            kem_x25519=x25519.X25519PrivateKey.generate(),
            kem_mlkem=(
                mlkem.MLKEM768PrivateKey.generate()
                if algorithm is KemAlgorithm.MLKEM768_X25519
                else None
            ),
            kem_algorithm=algorithm,
        )

    def public(self) -> PublicKeys:
        """Return the matching public keys."""
        kem = self.kem_x25519.public_key().public_bytes_raw()
        if self.kem_mlkem is not None:
            kem = self.kem_mlkem.public_key().public_bytes_raw() + kem
        return PublicKeys(
            signing=self.signing.public_key().public_bytes_raw(),
            kem=kem,
            kem_algorithm=self.kem_algorithm,
        )

    def kem_private_key(self) -> KemPrivateKey:
        """Return the cryptography KEM private key object to decrypt with."""
        if self.kem_mlkem is None:
            return self.kem_x25519
        return hpke.MLKEM768X25519PrivateKey(self.kem_mlkem, self.kem_x25519)

    def to_bytes(self) -> bytes:
        """Return the private material, unencrypted: keep it in an encrypted store.

        Layout: b"FRKP", version 1, algorithm code, Ed25519 raw (32), then the
        ML-KEM-768 seed (64, hybrid only), then X25519 raw (32).
        """
        parts = [
            _PRIVATE_MAGIC,
            bytes([_PRIVATE_VERSION, _KEM_CODES[self.kem_algorithm]]),
            self.signing.private_bytes_raw(),
        ]
        if self.kem_mlkem is not None:
            parts.append(self.kem_mlkem.private_bytes_raw())
        parts.append(self.kem_x25519.private_bytes_raw())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyPairs:
        """Parse the output of `to_bytes`; raise `KeyFormatError` on anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise KeyFormatError("private keys: expected bytes")
        raw = bytes(data)
        if raw[:4] != _PRIVATE_MAGIC or len(raw) < 6:
            raise KeyFormatError("private keys: not a fieldreg private key")
        if raw[4] != _PRIVATE_VERSION:
            raise KeyFormatError("private keys: unsupported version")
        codes = {code: algorithm for algorithm, code in _KEM_CODES.items()}
        algorithm = codes.get(raw[5])
        if algorithm is None:
            raise KeyFormatError("private keys: unknown KEM algorithm")
        is_hybrid = algorithm is KemAlgorithm.MLKEM768_X25519
        seed_bytes = _MLKEM_SEED_BYTES if is_hybrid else 0
        if len(raw) != 6 + 2 * _RAW_KEY_BYTES + seed_bytes:
            raise KeyFormatError("private keys: wrong length")
        signing, rest = raw[6:38], raw[38:]
        return cls(
            signing=ed25519.Ed25519PrivateKey.from_private_bytes(signing),
            kem_x25519=x25519.X25519PrivateKey.from_private_bytes(rest[seed_bytes:]),
            kem_mlkem=(
                mlkem.MLKEM768PrivateKey.from_seed_bytes(rest[:seed_bytes]) if is_hybrid else None
            ),
            kem_algorithm=algorithm,
        )
