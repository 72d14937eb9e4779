"""The encrypted field store: registrations, their per-field versions, the
append-only change log (whose unsent tail is the outbox), the edits received
from the hub, and name match keys.

All SQL of the device lives here and in `field_client.sync_store` (enrolment,
the pushed mark, pulled edits; with `field_client.outbox` and
`field_client.pull_store`), reached as `Store.sync`, besides opening and
upgrading the file in `field_client.db`. Every write runs in
one `BEGIN IMMEDIATE` transaction that also persists the HLC and the device
sequence, so a crash leaves either the record with its outbox entries or
neither.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from field_client import db
from field_client.sync_store import SyncStatus, SyncStore
from field_client.unlock import KeyFile, WrongPassphrase, check_passphrase_strength, new_key_file
from schemas.fields import flatten, flatten_doc, split_fields, unflatten
from schemas.ids import uuid7
from schemas.matching import REVIEW_THRESHOLD, profile, score
from schemas.names import match_keys, name_similarity, query_keys
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

__all__ = [
    "HistoryEntry",
    "NoStore",
    "NotFound",
    "PossibleDuplicate",
    "RecordSummary",
    "SearchHit",
    "Store",
    "StoreExists",
    "StoreStatus",
    "UnfinishedStore",
    "UnreadableRecord",
    "UnusableDataDir",
    "display_name",
    "operator_name",
]

DB_NAME = "store.db"
KEY_NAME = "store.key"
PENDING_KEY_NAME = KEY_NAME + ".new"  # a passphrase change's new key file, until it is done
READ_ONLY_FIELDS = frozenset({"registration", "schema_version", "merged_into"})
_SEARCH_CANDIDATES = 200


class NotFound(LookupError):
    """No record with that id (or id prefix) in this store."""


class NoStore(FileNotFoundError):
    """No key file in the directory: no store was made there."""


class StoreExists(FileExistsError):
    """`init` on a directory that already holds a store."""


class UnfinishedStore(ValueError):
    """A database whose `init` stopped before it wrote the device's identity."""


class UnusableDataDir(OSError):
    """`init` cannot make a store at that path (a file, no permission): nothing made."""


class UnreadableRecord(ValueError):
    """A stored record (received from the hub) whose fields of this schema version
    are not a valid `Registration`: typically a record whose first edits have not
    been pulled yet. Its document and history are kept."""


@dataclass(frozen=True)
class RecordSummary:
    id: str
    name: str
    site: str
    scenario: str | None
    registered_at: str


@dataclass(frozen=True)
class SearchHit:
    id: str
    name: str
    site: str
    score: float


@dataclass(frozen=True)
class PossibleDuplicate:
    """A local record that may be the same person as a new registration."""

    id: str
    name: str
    site: str
    registered_at: str
    score: float
    why: str


@dataclass(frozen=True)
class HistoryEntry:
    field: str
    value: Any
    stamp: Stamp
    device_id: str
    operator: str
    is_current: bool


@dataclass(frozen=True)
class StoreStatus:
    device_id: str
    site: str
    records: int
    own_records: int
    changes: int
    pending_outbox: int
    last_stamp: Stamp
    sync: SyncStatus


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _names(doc: Mapping[str, Any], *keys: str) -> list[str]:
    # Documents pulled from the hub may not validate: read names defensively.
    names = doc.get("names")
    names = names if isinstance(names, dict) else {}
    return [p for p in (names.get(k) for k in keys) if isinstance(p, str) and p]


def display_name(doc: Mapping[str, Any]) -> str:
    """`Given Family (original)` for lists and search results."""
    latin = " ".join(_names(doc, "given", "family"))
    original = " ".join(_names(doc, "given_original", "family_original"))
    if latin and original:
        return f"{latin} ({original})"
    return latin or original or "?"


def _all_names(doc: Mapping[str, Any]) -> list[str]:
    names = doc.get("names")
    aliases = names.get("aliases") if isinstance(names, dict) else None
    extra = [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []
    return _names(doc, "given", "family", "given_original", "family_original") + extra


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


def _read_doc(row: Any) -> tuple[Registration, dict[str, Any]]:
    """The record in a `records` row and its other fields: `{path: value}` of the
    paths this schema version does not know, kept as received (an older
    version's retired field, a newer version's field).

    Raises `UnreadableRecord` when this version's fields do not validate.
    """
    try:
        return Registration.model_validate_json(row.doc), {}
    except ValidationError as exc:
        error = exc
    known, other = split_fields(flatten_doc(json.loads(row.doc)))
    if other:
        try:
            return Registration.model_validate({"id": row.id, **unflatten(known)}), other
        except ValidationError as exc:
            error = exc
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    raise UnreadableRecord(
        f"record {row.id} does not fit this version of fieldreg"
        f" ({error.error_count()} problem(s), first: {where}: {first['msg']});"
        " it is kept as received: update fieldreg or sync again"
    )


def _doc_json(record: Registration, other: Mapping[str, Any]) -> str:
    """The `doc` column: the canonical record, with its other fields beside it."""
    if not other:
        return record.model_dump_json()
    return _dumps({"id": str(record.id), **unflatten({**flatten(record), **other})})


def _remove_store_files(data_dir: Path) -> None:
    for name in (KEY_NAME, DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"):
        (data_dir / name).unlink(missing_ok=True)


def _bootstrap(engine: sa.Engine, *, site: str, operator: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(db.meta),
            [
                {"key": "device_id", "value": str(uuid7())},
                {"key": "site", "value": site},
                {"key": "operator", "value": operator},
                {"key": "hlc", "value": Stamp(0, 0).encode()},
                {"key": "device_seq", "value": "0"},
                {"key": "pushed_seq", "value": "0"},
            ],
        )


def _make_data_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise UnusableDataDir(f"{data_dir} is a file, not a directory: choose another --data-dir")
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _unusable(data_dir, exc) from None


def _unusable(data_dir: Path, exc: OSError) -> UnusableDataDir:
    reason = (exc.strerror or str(exc)).lower()
    return UnusableDataDir(
        f"cannot make a store in {data_dir} ({reason}): choose another --data-dir"
    )


def _missing_database(db_path: Path, state: str) -> db.MissingDatabase:
    return db.MissingDatabase(
        f"{db_path} is {state}: the store cannot be opened without its database;"
        " put it back from a backup (nothing was changed)"
    )


class Store:
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
        _make_data_dir(data_dir)
        if (data_dir / KEY_NAME).exists() or (data_dir / DB_NAME).exists():
            raise StoreExists(f"{data_dir} already holds a store")
        data_key = os.urandom(32)
        key_file = new_key_file(passphrase, data_key, memory_kib=kdf_memory_kib)
        with db.private_umask():
            try:
                key_file.save(data_dir / KEY_NAME)
            except OSError as exc:
                raise _unusable(data_dir, exc) from None
            try:
                engine = db.connect_engine(data_dir / DB_NAME, data_key, create=True)
                _bootstrap(engine, site=site, operator=operator)
                return cls(data_dir, engine, wall_ms=wall_ms)
            except Exception:
                # A store that was never finished holds no one: leave no files that
                # would make the next `init` say the directory holds a store.
                _remove_store_files(data_dir)
                raise

    @classmethod
    def init_unencrypted_for_benchmark(cls, data_dir: Path, *, site: str, operator: str) -> Store:
        """The same store without SQLCipher, only to measure what encryption costs.

        Never used for people's data: nothing in the CLI reaches it.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.connect_engine(data_dir / DB_NAME, None, create=True)
        _bootstrap(engine, site=site, operator=operator)
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
        cls.check_present(data_dir)
        key_path, pending = data_dir / KEY_NAME, data_dir / PENDING_KEY_NAME
        try:
            store = cls._unlock(data_dir, key_path, passphrase, wall_ms)
        except (WrongPassphrase, db.DatabaseLocked) as exc:
            if not pending.exists():
                raise
            # A passphrase change stopped part-way (`change_passphrase`): if the
            # database was re-keyed already, the new key file opens it.
            try:
                store = cls._unlock(data_dir, pending, passphrase, wall_ms)
            except (WrongPassphrase, db.DatabaseLocked):
                if isinstance(exc, db.DatabaseLocked):
                    raise WrongPassphrase(
                        "a passphrase change was interrupted after the store was re-encrypted:"
                        " open it with the new passphrase"
                    ) from None
                raise exc from None
            os.replace(pending, key_path)  # finish the change
            return store
        pending.unlink(missing_ok=True)  # a change stopped before the database was re-keyed
        return store

    @classmethod
    def _unlock(
        cls, data_dir: Path, key_path: Path, passphrase: str, wall_ms: Callable[[], int]
    ) -> Store:
        db_path = data_dir / DB_NAME
        data_key = KeyFile.load(key_path).unwrap(passphrase)
        try:
            with db.private_umask():
                engine = db.connect_engine(db_path, data_key)
        except db.MissingDatabase:
            raise _missing_database(db_path, "empty" if db_path.exists() else "missing") from None
        except db.DatabaseLocked:
            raise db.DatabaseLocked(
                f"{db_path}: the key does not open this store: the database is damaged or"
                f" not the one of {KEY_NAME}; put both back from one backup (nothing was changed)"
            ) from None
        return cls(data_dir, engine, wall_ms=wall_ms)

    @staticmethod
    def check_present(data_dir: Path) -> None:
        """Raise `NoStore` or `db.MissingDatabase` (both FileNotFoundError) unless
        `data_dir` holds a key file and a database: check before asking for a passphrase."""
        if not (data_dir / KEY_NAME).exists():
            raise NoStore(f"no store in {data_dir}: run `fieldreg init` first")
        if not (data_dir / DB_NAME).is_file():
            raise _missing_database(data_dir / DB_NAME, "missing")

    def close(self) -> None:
        self._conn.close()
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def change_passphrase(self, old: str, new: str) -> None:
        """Re-wrap the data key under `new` and re-encrypt the database with a fresh key.

        Order matters for crash safety: the new key file is written beside the
        old one first, the database is re-keyed, then the new file replaces the
        old. `open` finishes a change that stopped after the re-keying (the new
        passphrase opens the store) and forgets one that stopped before it.
        """
        check_passphrase_strength(new)
        key_path = self.data_dir / KEY_NAME
        KeyFile.load(key_path).unwrap(old)  # raises WrongPassphrase
        new_key = os.urandom(32)
        pending = self.data_dir / PENDING_KEY_NAME
        with db.private_umask():
            new_key_file(new, new_key).save(pending)
        raw = self._conn.connection.dbapi_connection
        assert raw is not None
        self._conn.commit()
        # SQLCipher cannot re-key a database in WAL mode: leave it, re-key, return.
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw.execute("PRAGMA journal_mode = DELETE")
        raw.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
        raw.execute("PRAGMA journal_mode = WAL")
        os.replace(pending, key_path)

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
                    row = (rid, path, _dumps(value), stamp_text, self.device_id, no_base, no_base)
                    change_rows.append((*row, operator, seq, None, recorded_at))
                record_rows.append(self._record_row(record, {p: version for p in fields}))
                key_rows.extend((k, rid) for k in match_keys(record.names.all_names()))
                saved.append(record)
                if progress is not None and len(saved) % 250 == 0:
                    progress(250)
            if record_rows:
                self._conn.execute(sa.insert(db.records), record_rows)
                self._insert_changes(change_rows)
            self._insert_keys(key_rows)
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
            stored, other = _read_doc(row)
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
                    self._change_row(
                        row.id, path, after[path], version, versions.get(path), operator, seq
                    )
                )
                versions[path] = version
            self._conn.execute(sa.insert(db.changes), rows)
            new_row = self._record_row(record, versions, other)
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

    # Bulk inserts go through the driver with positional rows: for 10,000
    # registrations (about 150,000 change rows) SQLAlchemy's per-row parameter
    # processing costs more than SQLCipher's encryption.
    def _insert_changes(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self._conn.exec_driver_sql(
                "INSERT INTO changes (record_id, field, value, stamp, device_id, base_stamp,"
                " base_device, operator, device_seq, hub_seq, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def _insert_keys(self, rows: list[tuple[str, str]]) -> None:
        if rows:
            self._conn.exec_driver_sql(
                "INSERT OR IGNORE INTO match_keys (key, record_id) VALUES (?, ?)", rows
            )

    def _change_row(
        self,
        rid: str,
        path: str,
        value: Any,
        version: Version,
        base: Version | None,
        operator: str,
        seq: int | None,
    ) -> dict[str, Any]:
        return {
            "record_id": rid,
            "field": path,
            "value": _dumps(value),
            "stamp": version.stamp.encode(),
            "device_id": version.device_id,
            "base_stamp": base.stamp.encode() if base else None,
            "base_device": base.device_id if base else None,
            "operator": operator,
            "device_seq": seq,
            "hub_seq": None,
            "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    @staticmethod
    def _record_row(
        record: Registration,
        versions: Mapping[str, Version],
        other: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": str(record.id),
            "site": record.registration.site,
            "origin_device": record.registration.device_id,
            "scenario": record.situation.scenario.value,
            "registered_at": record.registration.registered_at.isoformat(),
            "doc": _doc_json(record, other or {}),
            "versions": db.encode_versions(versions),
        }

    # -- reads -----------------------------------------------------------------------------
    def _load_row(self, record_id: str) -> sa.Row[Any]:
        rid = record_id.strip().lower()
        if len(rid) < 8:
            raise NotFound(f"record id {record_id!r} is too short (give at least 8 characters)")
        # A range on the primary key (not LIKE, which SQLite cannot index here):
        # every id starting with `rid` sorts in [rid, rid + U+FFFF).
        ids = db.records.c.id
        stmt = sa.select(db.records).where(ids >= rid, ids < rid + "\uffff").limit(2)
        rows = self._conn.execute(stmt).all()
        if not rows:
            raise NotFound(f"no record {record_id!r} in this store")
        if len(rows) > 1:
            raise NotFound(f"record id prefix {record_id!r} is ambiguous: give more characters")
        return rows[0]

    def get(self, record_id: str) -> Registration:
        """The record with this id (or unique id prefix of >= 8 characters).

        Raises `NotFound`, or `UnreadableRecord` for a received record that
        does not validate under this schema version.
        """
        with self._conn.begin():
            return _read_doc(self._load_row(record_id))[0]

    def other_fields(self, record_id: str) -> dict[str, Any]:
        """`{path: value}` of the record's fields that this schema version does not
        know, kept as received: an older version's retired or renamed field (the
        hub keeps those from older devices), a newer version's field. Empty for
        most records. Raises like `get`."""
        with self._conn.begin():
            return _read_doc(self._load_row(record_id))[1]

    def history(self, record_id: str) -> list[HistoryEntry]:
        """Every recorded value of every field (own changes and received edits),
        by field and then oldest first, marking the current one."""
        c, r = db.changes.c, db.received.c
        with self._conn.begin():
            row = self._load_row(record_id)
            own = self._conn.execute(
                sa.select(c.field, c.value, c.stamp, c.device_id, c.operator).where(
                    c.record_id == row.id
                )
            ).all()
            received = self._conn.execute(
                sa.select(r.fields, r.stamp, r.device_id, r.operator)
                .where(r.record_id == row.id)
                .order_by(r.id)
            ).all()
        logged = [(f, json.loads(v), s, d, o) for f, v, s, d, o in own]
        for fields, stamp, device_id, operator in received:
            logged.extend((f, v, stamp, device_id, operator) for f, v in json.loads(fields).items())
        logged.sort(key=lambda e: (e[0], e[2], e[3]))
        current = db.decode_versions(row.versions)
        entries = []
        for path, value, stamp_text, device_id, operator in logged:
            stamp = Stamp.decode(stamp_text)
            held = current.get(path)
            is_current = held is not None and (held.stamp, held.device_id) == (stamp, device_id)
            entries.append(HistoryEntry(path, value, stamp, device_id, operator, is_current))
        return entries

    def list_records(
        self,
        *,
        site: str | None = None,
        scenario: str | None = None,
        need: str | None = None,
        registered_from: date | None = None,
        registered_to: date | None = None,
        limit: int | None = None,
    ) -> list[RecordSummary]:
        """Records matching every given filter, most recently registered first."""
        r = db.records.c
        stmt = sa.select(r.id, r.site, r.scenario, r.registered_at, r.doc).order_by(
            r.registered_at.desc(), r.id
        )
        if site:
            stmt = stmt.where(r.site == site)
        if scenario:
            stmt = stmt.where(r.scenario == scenario)
        if need:
            needs = sa.func.json_each(r.doc, "$.situation.needs").table_valued("value")
            stmt = stmt.where(
                sa.exists(sa.select(1).select_from(needs).where(needs.c.value == need))
            )
        if registered_from:
            stmt = stmt.where(r.registered_at >= registered_from.isoformat())
        if registered_to:
            # registered_at is ISO text; the day after `to` bounds it inclusively.
            stmt = stmt.where(sa.func.substr(r.registered_at, 1, 10) <= registered_to.isoformat())
        if limit:
            stmt = stmt.limit(limit)
        with self._conn.begin():
            rows = self._conn.execute(stmt).all()
        return [
            RecordSummary(
                row.id, display_name(json.loads(row.doc)), row.site, row.scenario, row.registered_at
            )
            for row in rows
        ]

    def search(self, text: str, *, limit: int = 20) -> list[SearchHit]:
        """Records whose names match `text` in any script or spelling, best first.

        Candidates come from the match-key index (cost grows with candidates,
        not with the store); the best `_SEARCH_CANDIDATES` by matched query
        tokens are then scored by name similarity.
        """
        by_token = query_keys(text)
        key_to_tokens: dict[str, set[str]] = {}
        for token, keys in by_token.items():
            for key in keys:
                key_to_tokens.setdefault(key, set()).add(token)
        if not key_to_tokens:
            return []
        # SQLite ranks the candidates itself (a common name matches thousands of
        # keys; fetching them all into Python was the cost of a search).
        order = {token: i for i, token in enumerate(by_token)}
        which_token = {key: min(order[t] for t in toks) for key, toks in key_to_tokens.items()}
        mk = db.match_keys.c
        matched = sa.func.count(sa.distinct(sa.case(which_token, value=mk.key))).label("matched")
        hits = sa.func.count().label("hits")
        ranked = (
            sa.select(mk.record_id, matched)
            .where(mk.key.in_(list(key_to_tokens)))
            .group_by(mk.record_id)
            .order_by(matched.desc(), hits.desc(), mk.record_id)
            .limit(_SEARCH_CANDIDATES)
        )
        with self._conn.begin():
            tokens = {rid: n for rid, n in self._conn.execute(ranked)}
            best = list(tokens)
            r = db.records.c
            rows = self._conn.execute(sa.select(r.id, r.site, r.doc).where(r.id.in_(best))).all()
        scored = []
        for row in rows:
            doc = json.loads(row.doc)
            score = name_similarity(text, _all_names(doc)) * (
                0.5 + 0.5 * tokens[row.id] / len(by_token)
            )
            scored.append(SearchHit(row.id, display_name(doc), row.site, round(score, 1)))
        scored.sort(key=lambda h: (-h.score, h.id))
        return scored[:limit]

    def possible_duplicates(
        self, item: RegistrationCreate, *, limit: int = 5
    ) -> list[PossibleDuplicate]:
        """Local records (own and pulled) that may be this person, best first.

        Offline: candidates come from the name-key index like `search`, then
        each is scored field by field with `schemas.matching`, with key
        frequencies counted among the candidates; those at or above the review
        threshold are returned with the fields that agreed.
        """
        names = " ".join(item.names.all_names())
        new = profile(item.model_dump(mode="json"))
        found: list[PossibleDuplicate] = []
        candidates = self.search(names, limit=_SEARCH_CANDIDATES) if names.strip() else []
        with self._conn.begin():
            rows = self._conn.execute(
                sa.select(
                    db.records.c.id, db.records.c.doc, db.records.c.site, db.records.c.registered_at
                ).where(db.records.c.id.in_([c.id for c in candidates]))
            ).all()
        # How many records carry each of the new record's keys: the candidates
        # share its names, so counting among them (plus the new record) stands
        # in for the hub's index, which the scores' thresholds assume.
        docs = {row.id: json.loads(row.doc) for row in rows}
        profiles = {rid: profile(doc) for rid, doc in docs.items()}
        counts = Counter(k for p in profiles.values() for k in p.keys if k in new.keys)
        key_counts = {k: counts[k] + 1 for k in new.keys}
        for row in rows:
            doc = docs[row.id]
            match = score(new, profiles[row.id], key_counts=key_counts)
            if match.score < REVIEW_THRESHOLD or doc.get("merged_into"):
                continue
            agreed = [f"{f.field}: {f.detail}" for f in match.explanation if f.outcome == "agree"]
            found.append(
                PossibleDuplicate(
                    row.id,
                    display_name(doc),
                    row.site,
                    row.registered_at[:10],
                    round(match.score, 2),
                    "; ".join(agreed) or "names are close",
                )
            )
        found.sort(key=lambda d: (-d.score, d.id))
        return found[:limit]

    def status(self) -> StoreStatus:
        """Counts and the outbox backlog."""
        with self._conn.begin():
            meta = {k: v for k, v in self._conn.execute(sa.select(db.meta.c.key, db.meta.c.value))}
            count = sa.select(sa.func.count()).select_from
            records = self._conn.execute(count(db.records)).scalar_one()
            own = self._conn.execute(
                count(db.records).where(db.records.c.origin_device == self.device_id)
            ).scalar_one()
            # Field changes: own ones are a row each, a received edit holds several.
            changes = self._conn.execute(count(db.changes)).scalar_one() + int(
                self._conn.exec_driver_sql(
                    "SELECT coalesce(sum((SELECT count(*) FROM json_each(fields))), 0)"
                    " FROM received"
                ).scalar_one()
            )
        pending = int(meta["device_seq"]) - int(meta["pushed_seq"])
        return StoreStatus(
            self.device_id,
            self.site,
            records,
            own,
            changes,
            pending,
            Stamp.decode(meta["hlc"]),
            self.sync.status(),
        )

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
