"""Sealing identifying data at rest: AES-256-GCM under a per-record data key,
itself wrapped by the hub master key.

Each sealed value is bound (as associated data) to its record id and purpose,
so a sealed blob copied onto another record or column does not open.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["RecordCipher", "SealError", "new_wrapped_key"]

_NONCE = 12


class SealError(Exception):
    """A sealed value or wrapped key did not open (damaged, or a wrong key)."""


def _wrap_aad(record_id: str) -> bytes:
    return b"fieldreg/record-key/v1\x00" + record_id.encode()


def new_wrapped_key(master_key: bytes, record_id: str) -> bytes:
    """A fresh data key for `record_id`, wrapped under the master key."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(master_key).encrypt(nonce, os.urandom(32), _wrap_aad(record_id))


class RecordCipher:
    """Seals and opens JSON values of one record."""

    def __init__(self, master_key: bytes, record_id: str, wrapped_key: bytes) -> None:
        try:
            key = AESGCM(master_key).decrypt(
                wrapped_key[:_NONCE], wrapped_key[_NONCE:], _wrap_aad(record_id)
            )
        except (InvalidTag, ValueError):
            raise SealError(f"the data key of record {record_id} does not open") from None
        self._aead = AESGCM(key)
        self._record_id = record_id.encode()

    def seal(self, value: Any, purpose: str) -> bytes:
        """Encrypt `value` (JSON) for this record and `purpose` (e.g. 'state', 'change')."""
        nonce = os.urandom(_NONCE)
        plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        return nonce + self._aead.encrypt(
            nonce, plain, self._record_id + b"\x00" + purpose.encode()
        )

    def open(self, sealed: bytes, purpose: str) -> Any:
        """Decrypt a value sealed by `seal` with the same purpose."""
        try:
            plain = self._aead.decrypt(
                sealed[:_NONCE], sealed[_NONCE:], self._record_id + b"\x00" + purpose.encode()
            )
        except (InvalidTag, ValueError):
            raise SealError("a sealed value does not open") from None
        return json.loads(plain)
