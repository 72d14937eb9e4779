"""The encrypted field store: registrations, their per-field versions, the
append-only change log (whose unsent tail is the outbox), the edits received
from the hub, and name match keys.

`Store` opens one and holds its write path: registering and editing (each
one transaction) and reading the outbox. Its files (key file, database,
passphrase change) are `field_client.store_files`'s; the rows it writes are
built in `field_client.store_rows`; its read-only queries come from its base
class in `field_client.store_reads`. All SQL of the device lives in these, in
`field_client.sync_store` (enrolment, the pushed mark, pulled edits; with
`field_client.outbox` and `field_client.pull_store`), reached as `Store.sync`,
and in `field_client.db` (opening and upgrading the file). Every write runs in
one `BEGIN IMMEDIATE` transaction that also persists the HLC and the device
sequence, so a crash leaves either the record with its outbox entries or
neither.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from field_client import db, store_files
from field_client.store_files import DB_NAME, KEY_NAME, UnfinishedStore
from field_client.store_reads import StoreReads, read_doc
from field_client.store_rows import change_row, dumps, insert_changes, insert_keys, record_row
from field_client.sync_store import SyncStore
from field_client.unlock import check_passphrase_strength
from schemas.fields import flatten, unflatten
from schemas.ids import uuid7
from schemas.names import match_keys
from schemas.record import (
    HIDDEN_IN_LINE,
    Registration,
    RegistrationContext,
    RegistrationCreate,
)
from schemas.validation import FieldError, InvalidRecord, validate
from sync.changes import FieldChange, Version
from sync.hlc import Clock, Stamp, system_ms
from sync.protocol import MAX_TEXT

__all__ = ["Store", "operator_name"]


READ_ONLY_FIELDS = frozenset({"registration", "schema_version", "merged_into"})


def operator_name(value: str) -> str:
    """The operator as the change log keeps it: trimmed, 1 to `MAX_TEXT` characters
    of text, what the hub accepts as an edit's author (`o`).

    Raises `InvalidRecord`: a name the hub would refuse must never reach the
    outbox, where it would block every later sync.
    """
    name = value.strip()
    if not name or len(name) > MAX_TEXT:
        raise InvalidRecord(
            [
                FieldError(
                    "operator",
                    f"give a name of 1 to {MAX_TEXT} characters (this one has {len(name)}"
                    " without the spaces around it)",
                )
            ]
        )
    try:
        name.encode()
    except UnicodeEncodeError:
        raise InvalidRecord(
            [FieldError("operator", "not valid text (bytes that are not UTF-8): retype it")]
        ) from None
    found = HIDDEN_IN_LINE.search(name)
    if found:
        raise InvalidRecord(
            [FieldError("operator", f"contains the invisible character U+{ord(found[0]):04X}")]
        )
    return name


class Store(StoreReads):
    """An unlocked device store. Use `Store.init` or `Store.open`; `close()` when done."""

    def __init__(self, data_dir: Path, engine: sa.Engine, *, wall_ms: Callable[[], int]) -> None:
        self.data_dir = data_dir
        self._engine = engine
        self._conn = engine.connect()
        meta = self._meta()
        if "device_id" not in meta:
            self.close()
            raise UnfinishedStore(
                f"the store in {data_dir} was never finished (`fieldreg init` stopped"
                f" part-way) and holds no one: remove its {DB_NAME}* and {KEY_NAME} files"
                " and run `fieldreg init` again"
            )
        self.device_id = meta["device_id"]
        self.site = meta["site"]
        self.operator = meta.get("operator", "")
        self._clock = Clock(wall_ms=wall_ms, last=Stamp.decode(meta["hlc"]))
        self.sync = SyncStore(self._conn, self._clock, device_id=self.device_id, wall_ms=wall_ms)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        data_dir: Path,
        passphrase: str,
        *,
        site: str,
        operator: str,
        wall_ms: Callable[[], int] = system_ms,
        kdf_memory_kib: int = 64 * 1024,
    ) -> Store:
        """Create a new store in `data_dir`; refuses a weak passphrase or an existing store."""
        check_passphrase_strength(passphrase)
        validate(
            RegistrationContext,
            {
                "site": site,
                "device_id": "x",
                "operator": operator,
                "registered_at": "2000-01-01T00:00:00Z",
            },
        )
        operator = operator_name(operator)
        return store_files.create(
            data_dir,
            passphrase,
            site=site,
            operator=operator,
            kdf_memory_kib=kdf_memory_kib,
            open_engine=lambda engine: cls(data_dir, engine, wall_ms=wall_ms),
        )

    @classmethod
    def init_unencrypted_for_benchmark(cls, data_dir: Path, *, site: str, operator: str) -> Store:
        """The same store without SQLCipher, only to measure what encryption costs.

        Never used for people's data: nothing in the CLI reaches it.
        """
        engine = store_files.create_unencrypted_for_benchmark(
            data_dir, site=site, operator=operator
        )
        return cls(data_dir, engine, wall_ms=system_ms)

    @classmethod
    def open(
        cls, data_dir: Path, passphrase: str, *, wall_ms: Callable[[], int] = system_ms
    ) -> Store:
        """Unlock the store; nothing is touched or created when it does not open.

        Raises `WrongPassphrase`, `DamagedKeyFile`, FileNotFoundError (no store,
        or `db.MissingDatabase`: the database file is missing or empty),
        `db.DatabaseLocked` (the key does not open the database) or `db.NewerStore`.
        """
        return store_files.unlock(
            data_dir, passphrase, lambda engine: cls(data_dir, engine, wall_ms=wall_ms)
        )

    @staticmethod
    def check_present(data_dir: Path) -> None:
        """Raise `NoStore` or `db.MissingDatabase` (both FileNotFoundError) unless
        `data_dir` holds a key file and a database: check before asking for a passphrase."""
        store_files.check_present(data_dir)

    def close(self) -> None:
        self._conn.close()
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def change_passphrase(self, old: str, new: str) -> None:
        """Re-wrap the data key under `new` and re-encrypt the database with a fresh
        key, crash-safely (`store_files.change_passphrase`)."""
        store_files.change_passphrase(self._conn, self.data_dir, old, new)

    # -- meta ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        with self._conn.begin():
            rows = self._conn.execute(sa.select(db.meta.c.key, db.meta.c.value)).all()
        return {k: v for k, v in rows}

    def _set_meta(self, values: Mapping[str, str]) -> None:
        stmt = sa.update(db.meta).where(db.meta.c.key == sa.bindparam("k"))
        self._conn.execute(
            stmt.values(value=sa.bindparam("v")), [{"k": k, "v": v} for k, v in values.items()]
        )

    def _next_seq(self) -> int:
        return int(
            self._conn.execute(
                sa.select(db.meta.c.value).where(db.meta.c.key == "device_seq")
            ).scalar_one()
        )

    # -- writes ----------------------------------------------------------------------------
    def register(
        self,
        items: Sequence[RegistrationCreate],
        *,
        operator: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Registration]:
        """Save new registrations and their outbox entries in one transaction.

        An item whose `id` is already stored or given twice in `items` is
        refused (`InvalidRecord`), and then nothing of the batch is written,
        as for an `operator` that `operator_name` refuses (None: the store's
        operator).
        """
        operator = operator_name(self.operator if operator is None else operator)
        now = datetime.fromtimestamp(self._clock.now().wall_ms / 1000, UTC)
        saved: list[Registration] = []
        record_rows: list[dict[str, Any]] = []
        change_rows: list[tuple[Any, ...]] = []
        key_rows: list[tuple[str, str]] = []
        recorded_at = now.isoformat(timespec="seconds")
        with self._conn.begin():
            seq = self._next_seq()
            ids = [str(item.id) for item in items if item.id is not None]
            twice = sorted(i for i, n in Counter(ids).items() if n > 1)
            if twice:
                raise InvalidRecord([FieldError("id", f"given twice: {i}") for i in twice])
            if ids:
                existing = set(
                    self._conn.execute(
                        sa.select(db.records.c.id).where(db.records.c.id.in_(ids))
                    ).scalars()
                )
                if existing:
                    raise InvalidRecord(
                        [FieldError("id", f"already registered: {i}") for i in sorted(existing)]
                    )
            for item in items:
                context = {
                    "site": self.site,
                    "device_id": self.device_id,
                    "operator": operator,
                    "registered_at": now,
                    "location": item.location,
                }
                content = item.model_dump(exclude={"id", "location"})
                record = Registration(id=item.id or uuid7(), registration=context, **content)
                stamp = self._clock.now()
                version = Version(stamp, self.device_id)
                fields = {p: v for p, v in flatten(record).items() if v not in (None, [])}
                rid = str(record.id)
                stamp_text = stamp.encode()
                for path, value in fields.items():
                    seq += 1
                    no_base = None  # a new record: its author saw nothing before
                    row = (rid, path, dumps(value), stamp_text, self.device_id, no_base, no_base)
                    change_rows.append((*row, operator, seq, None, recorded_at))
                record_rows.append(record_row(record, {p: version for p in fields}))
                key_rows.extend((k, rid) for k in match_keys(record.names.all_names()))
                saved.append(record)
                if progress is not None and len(saved) % 250 == 0:
                    progress(250)
            if record_rows:
                self._conn.execute(sa.insert(db.records), record_rows)
                insert_changes(self._conn, change_rows)
            insert_keys(self._conn, key_rows)
            self._set_meta({"device_seq": str(seq), "hlc": self._clock.last.encode()})
        if progress is not None:
            progress(len(saved) % 250)
        return saved

    def edit(
        self, record_id: str, values: Mapping[str, Any], *, operator: str | None = None
    ) -> Registration:
        """Apply `{field path: value}` to a record; validate the whole result first.

        Returns the record as stored. Unchanged values record nothing. An
        `operator` that `operator_name` refuses (None: the store's operator)
        raises `InvalidRecord` and writes nothing.
        """
        operator = operator_name(self.operator if operator is None else operator)
        bad = [FieldError(p, "cannot be edited") for p in values if p in READ_ONLY_FIELDS]
        if bad:
            raise InvalidRecord(bad)
        with self._conn.begin():
            row = self._load_row(record_id)
            stored, other = read_doc(row)
            current = flatten(stored)
            unknown = [
                FieldError(p, "a field of another schema version: kept, not editable here")
                if p in other
                else FieldError(p, "unknown field")
                for p in values
                if p not in current
            ]
            if unknown:
                raise InvalidRecord(unknown)
            merged = {**current, **values}
            record = validate(Registration, {"id": row.id, **unflatten(merged)})
            after = flatten(record)
            changed = [p for p in values if after[p] != current[p]]
            if not changed:
                return record
            versions = db.decode_versions(row.versions)
            version = Version(self._clock.now(), self.device_id)
            seq = self._next_seq()
            rows = []
            for path in changed:
                seq += 1
                rows.append(
                    change_row(
                        row.id, path, after[path], version, versions.get(path), operator, seq
                    )
                )
                versions[path] = version
            self._conn.execute(sa.insert(db.changes), rows)
            new_row = record_row(record, versions, other)
            self._conn.execute(
                sa.update(db.records).where(db.records.c.id == row.id).values(new_row)
            )
            if any(p.startswith("names.") for p in changed):
                self._conn.execute(
                    sa.delete(db.match_keys).where(db.match_keys.c.record_id == row.id)
                )
                keys = [
                    {"key": k, "record_id": row.id} for k in match_keys(record.names.all_names())
                ]
                if keys:
                    self._conn.execute(sa.insert(db.match_keys), keys)
            self._set_meta({"device_seq": str(seq), "hlc": self._clock.last.encode()})
        return record

    def outbox(self, *, after_seq: int, limit: int) -> list[FieldChange]:
        """This device's changes with device_seq > `after_seq`, in sequence order."""
        c = db.changes.c
        stmt = (
            sa.select(db.changes)
            .where(c.device_seq > after_seq)
            .order_by(c.device_seq)
            .limit(limit)
        )
        with self._conn.begin():
            rows = self._conn.execute(stmt).all()
        return [
            FieldChange(
                record_id=row.record_id,
                field=row.field,
                value=json.loads(row.value),
                version=Version(Stamp.decode(row.stamp), row.device_id),
                base=Version(Stamp.decode(row.base_stamp), row.base_device)
                if row.base_stamp
                else None,
                operator=row.operator,
                device_seq=row.device_seq,
            )
            for row in rows
        ]
