"""Sealing identifying data at rest: AES-256-GCM under a per-record data key,
itself wrapped by the hub master key.

Each sealed value is bound (as associated data) to its record id and purpose,
so a sealed blob copied onto another record or column does not open.

JSON of `COMPRESS_FROM` bytes or more is compressed (zstd) before it is
encrypted: a record's state shrinks to a third and a change to about two
thirds, so a push writes about half the bytes it did. JSON never begins
with zstd's magic number, so values sealed before compression still open
as they were. What a reader of the database file learns from a sealed
value's length is about what it learned before: roughly how much was said.
"""

from __future__ import annotations

import json
import os
import threading
from functools import lru_cache
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic_core import to_json

__all__ = [
    "COMPRESS_FROM",
    "RecordCipher",
    "SealError",
    "compact_json",
    "new_record_cipher",
    "new_wrapped_key",
]

_NONCE = 12
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
COMPRESS_FROM = 256
"""Bytes of JSON from which a sealed value is compressed first (below, zstd's
frame costs about as much as it saves)."""
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_codecs = threading.local()  # zstd contexts are not for two threads at once


def _compressor() -> zstandard.ZstdCompressor:
    try:
        return _codecs.compressor
    except AttributeError:
        # Level -1: a state of 2.2 kB to 0.7 kB in 3.5 µs; level 1 makes it
        # 0.57 kB in 8 µs, which packs no more rows in a page.
        _codecs.compressor = zstandard.ZstdCompressor(level=-1)
        return _codecs.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    try:
        return _codecs.decompressor
    except AttributeError:
        _codecs.decompressor = zstandard.ZstdDecompressor()
        return _codecs.decompressor


def compact_json(value: Any) -> bytes:
    """Compact UTF-8 JSON of `value` in a third of the time `seal`'s encoder takes.

    It reads back the same, but is not always the same text: floats may be
    written differently (`1e-5`, not `1e-05`). Use it for values only ever
    read back (a record's state, sealed with `seal_json`), not for text whose
    length is relied on (`server.feed.edit_size` sizes changes by theirs).
    """
    return to_json(value, inf_nan_mode="constants")


class SealError(Exception):
    """A sealed value or wrapped key did not open (damaged, or a wrong key)."""


def _wrap_aad(record_id: str) -> bytes:
    return b"fieldreg/record-key/v1\x00" + record_id.encode()


@lru_cache(maxsize=4)
def _master(master_key: bytes) -> AESGCM:
    # A hub has one master key; building its AES context once per process
    # instead of once per record is a measurable share of a 10,000-record push.
    return AESGCM(master_key)


def _wrap(master_key: bytes, record_id: str, data_key: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + _master(master_key).encrypt(nonce, data_key, _wrap_aad(record_id))


def new_wrapped_key(master_key: bytes, record_id: str) -> bytes:
    """A fresh data key for `record_id`, wrapped under the master key."""
    return _wrap(master_key, record_id, os.urandom(32))


def new_record_cipher(master_key: bytes, record_id: str) -> tuple[bytes, RecordCipher]:
    """A fresh data key for a new record: (the key wrapped under the master key,
    a cipher with it), without unwrapping what was just wrapped."""
    data_key = os.urandom(32)
    return _wrap(master_key, record_id, data_key), RecordCipher.from_data_key(data_key, record_id)


class RecordCipher:
    """Seals and opens JSON values of one record."""

    def __init__(self, master_key: bytes, record_id: str, wrapped_key: bytes) -> None:
        try:
            key = _master(master_key).decrypt(
                wrapped_key[:_NONCE], wrapped_key[_NONCE:], _wrap_aad(record_id)
            )
        except (InvalidTag, ValueError):
            raise SealError(f"the data key of record {record_id} does not open") from None
        self._aead = AESGCM(key)
        self._record_id = record_id.encode()

    @classmethod
    def from_data_key(cls, data_key: bytes, record_id: str) -> RecordCipher:
        """A cipher over an unwrapped data key (for a record whose key was just made)."""
        cipher = cls.__new__(cls)
        cipher._aead = AESGCM(data_key)
        cipher._record_id = record_id.encode()
        return cipher

    def seal(self, value: Any, purpose: str) -> bytes:
        """Encrypt `value` (JSON) for this record and `purpose` (e.g. 'state', 'change')."""
        return self.seal_json(_JSON.encode(value).encode(), purpose)

    def seal_json(self, plain: bytes, purpose: str) -> bytes:
        """Encrypt JSON text already encoded (what `open_json` gives back)."""
        if len(plain) >= COMPRESS_FROM:
            plain = _compressor().compress(plain)
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(
            nonce, plain, self._record_id + b"\x00" + purpose.encode()
        )

    def open(self, sealed: bytes, purpose: str) -> Any:
        """Decrypt a value sealed by `seal` with the same purpose."""
        return json.loads(self.open_json(sealed, purpose))

    def open_json(self, sealed: bytes, purpose: str) -> bytes:
        """Decrypt a value sealed by `seal` to its JSON text, without parsing it."""
        try:
            plain = self._aead.decrypt(
                sealed[:_NONCE], sealed[_NONCE:], self._record_id + b"\x00" + purpose.encode()
            )
        except (InvalidTag, ValueError):
            raise SealError("a sealed value does not open") from None
        if plain.startswith(_ZSTD_MAGIC):
            # Authenticated above: only the hub wrote it, so its size is trusted.
            return _decompressor().decompress(plain)
        return plain
