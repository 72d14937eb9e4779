"""Passphrases and the key file that unlocks the device database.

The database is encrypted by SQLCipher under a random 256-bit data key. The
data key is kept in `store.key`, wrapped (AES-256-GCM) under a key derived
from the operator's passphrase with Argon2id. A wrong passphrase fails the
unwrap, so the database file is never touched; changing the passphrase writes
a new key file atomically (and, see `field_client.store.Store.change_passphrase`,
re-encrypts the database under a fresh data key).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

__all__ = [
    "DamagedKeyFile",
    "KeyFile",
    "WeakPassphrase",
    "WrongPassphrase",
    "check_passphrase_strength",
    "new_key_file",
]

MIN_CHARS = 12
MIN_WORDS = 4
_AAD = b"fieldreg/store-key/v1"
# What a key file may ask of Argon2id: past these it is damaged, and honouring
# it could take all the device's memory or hours.
_MAX_MEMORY_KIB = 4 * 1024 * 1024
_MAX_ITERATIONS = 64
_MAX_LANES = 64


class WeakPassphrase(ValueError):
    """The passphrase is too weak to protect the people in the store."""


class WrongPassphrase(ValueError):
    """The passphrase does not unlock this store."""


class DamagedKeyFile(ValueError):
    """`store.key` is not a key file this version can read."""


def check_passphrase_strength(passphrase: str) -> None:
    """Raise `WeakPassphrase` unless it has >= 12 characters or >= 4 words."""
    words = [w for w in passphrase.split() if w]
    if len(passphrase) >= MIN_CHARS or len(words) >= MIN_WORDS:
        if len(set(passphrase)) < 4:
            raise WeakPassphrase(
                "passphrase repeats too few characters; use words you can remember"
            )
        return
    raise WeakPassphrase(
        f"passphrase too short: use at least {MIN_CHARS} characters or {MIN_WORDS} words"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class KeyFile:
    """The wrapped data key and the Argon2id parameters that unwrap it (not secret)."""

    salt: bytes
    nonce: bytes
    wrapped_key: bytes
    iterations: int = 3
    lanes: int = 4
    memory_kib: int = 64 * 1024

    def _kek(self, passphrase: str) -> bytes:
        kdf = Argon2id(
            salt=self.salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(passphrase.encode("utf-8"))

    def unwrap(self, passphrase: str) -> bytes:
        """Return the 32-byte database key; raise `WrongPassphrase` if it does not open."""
        try:
            return AESGCM(self._kek(passphrase)).decrypt(self.nonce, self.wrapped_key, _AAD)
        except InvalidTag:
            raise WrongPassphrase("wrong passphrase: the store was not unlocked") from None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "fieldreg-store-key/1",
                "kdf": "argon2id",
                "iterations": self.iterations,
                "lanes": self.lanes,
                "memory_kib": self.memory_kib,
                "salt": _b64(self.salt),
                "nonce": _b64(self.nonce),
                "wrapped_key": _b64(self.wrapped_key),
            },
            indent=2,
        )

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        """Read a key file; raise `DamagedKeyFile` naming the file when it is damaged."""
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != "fieldreg-store-key/1":
                raise ValueError("unknown format")
            key_file = cls(
                salt=base64.b64decode(data["salt"]),
                nonce=base64.b64decode(data["nonce"]),
                wrapped_key=base64.b64decode(data["wrapped_key"]),
                iterations=int(data["iterations"]),
                lanes=int(data["lanes"]),
                memory_kib=int(data["memory_kib"]),
            )
            key_file._check()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DamagedKeyFile(f"{path}: not a fieldreg key file ({exc})") from None
        return key_file

    def _check(self) -> None:
        """Raise ValueError unless Argon2id and AES-GCM can use these values."""
        if len(self.salt) < 8 or len(self.nonce) != 12 or len(self.wrapped_key) != 48:
            raise ValueError("salt, nonce or wrapped key of the wrong length")
        if not (1 <= self.iterations <= _MAX_ITERATIONS and 1 <= self.lanes <= _MAX_LANES):
            raise ValueError("iterations or lanes out of range")
        if not 8 * self.lanes <= self.memory_kib <= _MAX_MEMORY_KIB:
            raise ValueError("memory_kib out of range")

    def save(self, path: Path) -> None:
        """Write atomically (temp file, fsync, rename) with mode 0600."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def new_key_file(passphrase: str, data_key: bytes, *, memory_kib: int = 64 * 1024) -> KeyFile:
    """Wrap `data_key` under `passphrase` with a fresh salt and nonce."""
    check_passphrase_strength(passphrase)
    shell = KeyFile(
        salt=os.urandom(16), nonce=os.urandom(12), wrapped_key=b"", memory_kib=memory_kib
    )
    wrapped = AESGCM(shell._kek(passphrase)).encrypt(shell.nonce, data_key, _AAD)
    return KeyFile(
        salt=shell.salt,
        nonce=shell.nonce,
        wrapped_key=wrapped,
        iterations=shell.iterations,
        lanes=shell.lanes,
        memory_kib=memory_kib,
    )
