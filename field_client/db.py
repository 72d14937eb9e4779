"""The device database: one SQLCipher 4 file, its tables, and how it is opened.

The engine uses SQLAlchemy's SQLite dialect on the `sqlcipher3` driver and
gives SQLCipher a raw 256-bit key in a connect event (the `pysqlcipher`
dialect only accepts a passphrase in the URL, which would put a secret in a
string that SQLAlchemy may log and would add SQLCipher's own PBKDF2 on top of
our Argon2id). The key is checked before any other statement runs, so a wrong
key never writes to the file. Opening an existing store never creates a file:
a missing or empty database is refused (`MissingDatabase`), not made anew.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
import sqlcipher3.dbapi2 as sqlcipher
from sqlalchemy import event

from sync.changes import Version
from sync.hlc import Stamp

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "DatabaseLocked",
    "DriverError",
    "DriverOperationalError",
    "MissingDatabase",
    "NewerStore",
    "changes",
    "connect_engine",
    "decode_versions",
    "encode_versions",
    "match_keys",
    "meta",
    "received",
    "records",
]

# `PRAGMA user_version` of a store this version made or brought up to date:
# 0 is a store from before versions were kept (received field changes in
# `changes`, one row each); 1 keeps received edits in `received`; 2 writes
# `records.versions` grouped by version (`encode_versions`).
SCHEMA_VERSION = 2

SCHEMA = sa.MetaData()

meta = sa.Table(
    "meta",
    SCHEMA,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The current state of each record: its document and, per field path, the
# version (HLC stamp and origin device) that produced the value, in
# `versions` as `encode_versions` writes it.
records = sa.Table(
    "records",
    SCHEMA,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("site", sa.Text, nullable=False, index=True),
    sa.Column("origin_device", sa.Text, nullable=False),
    sa.Column("scenario", sa.Text, index=True),
    sa.Column("registered_at", sa.Text, nullable=False, index=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),
)

# Append-only log of every field change this device made: each row has its
# device_seq; those above the pushed high-water mark form the outbox.
# `outcome` is the hub's verdict on a change it did not simply apply:
# 'superseded', 'conflict' or 'quarantined:<reason>' ('applied' once a
# quarantined change is released). NULL at or below the pushed mark: applied
# (or taken under another batch id, `envelope.replayed`, whose verdicts this
# device never heard); above it, not acknowledged yet.
changes = sa.Table(
    "changes",
    SCHEMA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("record_id", sa.Text, nullable=False, index=True),
    sa.Column("field", sa.Text, nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("stamp", sa.Text, nullable=False),
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("base_stamp", sa.Text),
    sa.Column("base_device", sa.Text),
    sa.Column("operator", sa.Text, nullable=False),
    sa.Column("device_seq", sa.Integer, unique=True),
    sa.Column("hub_seq", sa.Integer),
    sa.Column("recorded_at", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text),
)

# Append-only log of every edit received from the hub, one row per edit:
# `fields` is the JSON object {path: value} of the fields it logged, `bases`
# {path: [stamp, device]} of the bases it named among them (NULL for none).
# With `changes` it is the history of every field.
received = sa.Table(
    "received",
    SCHEMA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("record_id", sa.Text, nullable=False, index=True),
    sa.Column("stamp", sa.Text, nullable=False),
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("operator", sa.Text, nullable=False),
    sa.Column("fields", sa.Text, nullable=False),
    sa.Column("bases", sa.Text),
    sa.Column("hub_seq", sa.Integer),
    sa.Column("recorded_at", sa.Text, nullable=False),
)

# Name match keys, derived at write time, so search is an index lookup.
match_keys = sa.Table(
    "match_keys",
    SCHEMA,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("record_id", sa.Text, primary_key=True, index=True),
    sqlite_with_rowid=False,
)


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


DriverError = sqlcipher.Error
"""What the driver raises where SQLAlchemy does not wrap it (a raw connection)."""
DriverOperationalError = sqlcipher.OperationalError
"""The driver's error for a store it could not use now (busy, disk), not a damaged one."""


class DatabaseLocked(RuntimeError):
    """The key does not open this database file (or the file is not a store)."""


class MissingDatabase(FileNotFoundError):
    """The store's database file is missing or empty: nothing was created."""


class NewerStore(ValueError):
    """The store was made or updated by a newer fieldreg than this one."""


def _pragmas(dbapi_conn: Any, key_hex: str | None, *, empty_ok: bool) -> None:
    # Let SQLAlchemy's `begin` event decide how a transaction starts.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        # SQLCipher logs a page that fails its check in three lines on stderr:
        # `DatabaseLocked`, or the CLI's line for a damaged store, says it in one.
        cur.execute("PRAGMA cipher_log_level = NONE")
        if key_hex is not None:
            cur.execute(f"PRAGMA key = \"x'{key_hex}'\"")
        objects = _count_objects(cur)
        if not objects and not empty_ok:
            raise MissingDatabase("the database file is empty")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")  # losing a write loses a person
        cur.execute("PRAGMA secure_delete = ON")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA busy_timeout = 10000")
    finally:
        cur.close()


def _count_objects(cur: Any) -> int:
    """The number of tables and indexes: the first read, so it checks the key."""
    try:
        [(objects,)] = cur.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlcipher.DatabaseError:
        raise DatabaseLocked("the key does not open this store") from None
    return int(objects)


def connect_engine(path: Path, key: bytes | None, *, create: bool = False) -> sa.Engine:
    """Open the store at `path` under `key`; `create=True` makes a new one.

    Without `create`, a missing or empty file raises `MissingDatabase` and
    nothing is created: SQLite opens it read-write, never creating it.
    `key=None` opens the same schema without SQLCipher encryption; it exists
    only so benchmarks can measure what encryption costs.
    """
    key_hex = key.hex() if key is not None else None
    if not create and not path.is_file():
        raise MissingDatabase(f"{path} is missing")
    url = sa.engine.URL.create(
        "sqlite",
        database=f"file:{quote(str(path))}",
        query={"mode": "rwc" if create else "rw", "uri": "true"},
    )
    engine = sa.create_engine(url, module=sqlcipher, poolclass=sa.pool.NullPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        _pragmas(dbapi_conn, key_hex, empty_ok=create)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Take the write lock up front: two writers never deadlock mid-way.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    with engine.begin() as conn:
        _bring_up_to_date(conn)
    return engine


def _bring_up_to_date(conn: sa.Connection) -> None:
    """Create what is missing and migrate a store of an older schema version,
    in the caller's transaction; `NewerStore` (nothing written) for a newer one."""
    version = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
    if version > SCHEMA_VERSION:
        raise NewerStore(
            f"this store was made by a newer fieldreg (store schema {version}, this"
            f" version reads up to {SCHEMA_VERSION}): update fieldreg to open it"
        )
    SCHEMA.create_all(conn)
    if version < 1:
        _move_received_changes(conn)
    if version < 2:
        _group_versions(conn)
    if version < SCHEMA_VERSION:
        conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _move_received_changes(conn: sa.Connection) -> None:
    """Schema 0 to 1: received field changes (rows of `changes` without a
    device_seq) become `received` rows, one per run of consecutive rows of one
    edit (record, stamp, device, operator, hub_seq), as a pull writes them now.
    (Schema 0 logged a field of a version once, so a run names each field once.)"""
    rows = conn.exec_driver_sql(
        "SELECT record_id, stamp, device_id, operator, hub_seq, recorded_at, field, value,"
        " base_stamp, base_device FROM changes WHERE device_seq IS NULL ORDER BY id"
    ).all()
    edits: list[tuple[Any, ...]] = []
    for edit, run in groupby(rows, key=lambda row: tuple(row[:6])):
        fields: dict[str, Any] = {}
        bases: dict[str, list[str]] = {}
        for *_, path, value, base_stamp, base_device in run:
            fields[path] = json.loads(value)
            if base_stamp is not None:
                bases[path] = [base_stamp, base_device]
        rid, stamp, device, operator, hub_seq, recorded_at = edit
        based = _dumps(bases) if bases else None
        edits.append((rid, stamp, device, operator, _dumps(fields), based, hub_seq, recorded_at))
    if edits:
        conn.exec_driver_sql(
            "INSERT INTO received (record_id, stamp, device_id, operator, fields, bases,"
            " hub_seq, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            edits,
        )
    conn.exec_driver_sql("DELETE FROM changes WHERE device_seq IS NULL")


def _group_versions(conn: sa.Connection) -> None:
    """Schema 1 to 2: `records.versions` from `{path: [stamp, device]}` (a
    stamp and device id written again for every field) to `encode_versions`."""
    rows = conn.exec_driver_sql("SELECT id, versions FROM records").all()
    updates = []
    for rid, text in rows:
        # One object per distinct version, so its fields share one entry.
        seen: dict[tuple[str, ...], Version] = {}
        by_path = {}
        for path, raw in json.loads(text).items():
            key = tuple(raw)
            version = seen.get(key)
            if version is None:
                version = seen[key] = Version.from_json(raw)
            by_path[path] = version
        updates.append((encode_versions(by_path), rid))
    if updates:
        conn.exec_driver_sql("UPDATE records SET versions = ? WHERE id = ?", updates)


def encode_versions(versions: Mapping[str, Version]) -> str:
    """The `records.versions` column: a JSON list with one entry per distinct
    version, `[stamp, device, path, path, ...]`, naming the fields it wrote.

    A record's fields mostly share the version of the edit that wrote them, so
    each stamp and device id is written once, not once per field. Fields that
    share a version object are grouped by identity (hashing a version costs
    more than encoding it); equal versions held by two objects give two
    entries, which `decode_versions` reads the same.
    """
    groups: dict[int, list[Any]] = {}
    for path, version in versions.items():
        group = groups.get(id(version))
        if group is None:
            group = groups[id(version)] = [version.stamp.encode(), version.device_id]
        group.append(path)
    return _JSON.encode(list(groups.values()))


def decode_versions(text: str) -> dict[str, Version]:
    """`{path: version}` from `encode_versions` text; raises ValueError on other text."""
    versions: dict[str, Version] = {}
    for entry in json.loads(text):
        if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[0], str)):
            raise ValueError(f"not a versions entry: {entry!r}")
        version = Version(Stamp.decode(entry[0]), entry[1])
        versions.update(dict.fromkeys(entry[2:], version))
    return versions


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@contextmanager
def private_umask() -> Iterator[None]:
    """Create files readable by the owner only (database, WAL, key file)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
