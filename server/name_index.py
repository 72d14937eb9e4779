"""A blind index of name match keys at the hub.

The device's match keys (`schemas.names`) are derived from names, so storing
them in clear would store the names. The hub stores HMAC-SHA256 of each key
under a key derived from the master key (HKDF): equal keys still meet in the
index, but the table alone says nothing about anyone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.names import match_keys, query_keys
from server.bulk import insert_rows
from server.models import NameKey

__all__ = ["NAME_PATHS", "IndexKey", "names_of", "reindex", "search_ids"]

name_keys = NameKey.__table__  # type: ignore[attr-defined]
NAME_FIELDS = ("names.given", "names.family", "names.given_original", "names.family_original")
NAME_PATHS = (*NAME_FIELDS, "names.aliases")  # every field `names_of` reads


_BLIND_CACHE = 100_000  # match keys remembered blinded (common names recur)


class IndexKey:
    """Turns match keys into index entries.

    Blinded keys are remembered (up to `_BLIND_CACHE`): a push of thousands of
    registrations meets the same common names again and again. They stay in
    the hub process's memory, as the names of any record it works on do.
    """

    def __init__(self, master_key: bytes) -> None:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fieldreg/name-index/v1")
        self._key = hkdf.derive(master_key)
        self._blinded: dict[str, str] = {}

    def blind(self, key: str) -> str:
        blinded = self._blinded.get(key)
        if blinded is None:
            blinded = hmac.digest(self._key, key.encode(), hashlib.sha256).hex()[:32]
            if len(self._blinded) < _BLIND_CACHE:
                self._blinded[key] = blinded
        return blinded


def names_of(fields: Mapping[str, Any]) -> list[str]:
    """Every name in a record's field values (`{path: value}`), any script."""
    names = [v for p in NAME_FIELDS if isinstance(v := fields.get(p), str) and v]
    aliases = fields.get("names.aliases")
    if isinstance(aliases, list):
        names.extend(a for a in aliases if isinstance(a, str))
    return names


def reindex(
    conn: sa.Connection,
    index: IndexKey,
    records: Mapping[str, Mapping[str, Any]],
    *,
    new: Collection[str] = (),
) -> None:
    """Replace the index entries of `records` (`{record id: {path: value}}`).

    `new` names records stored for the first time in this transaction: they
    have no entries to delete (records are never deleted, so neither are theirs).
    """
    if not records:
        return
    ids = [rid for rid in records if rid not in new]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        conn.execute(sa.delete(name_keys).where(name_keys.c.record_id.in_(chunk)))
    blind = index.blind
    rows = [
        (h, rid)
        for rid, fields in records.items()
        for h in {blind(k) for k in match_keys(names_of(fields))}
    ]
    insert_rows(conn, name_keys, ("key_hash", "record_id"), rows)


def search_ids(
    conn: sa.Connection, index: IndexKey, text: str, *, limit: int = 200
) -> dict[str, int]:
    """Candidate record ids for a name search, with how many query tokens each matched."""
    by_token = query_keys(text)
    blinded: dict[str, set[str]] = {}
    for token, keys in by_token.items():
        for key in keys:
            blinded.setdefault(index.blind(key), set()).add(token)
    if not blinded:
        return {}
    stmt = sa.select(name_keys.c.record_id, name_keys.c.key_hash).where(
        name_keys.c.key_hash.in_(list(blinded))
    )
    tokens: dict[str, set[str]] = {}
    for rid, key_hash in conn.execute(stmt):
        tokens.setdefault(rid, set()).update(blinded[key_hash])
    best = sorted(tokens, key=lambda rid: len(tokens[rid]), reverse=True)[:limit]
    return {rid: len(tokens[rid]) for rid in best}
