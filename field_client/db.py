"""The device database: one SQLCipher 4 file, its tables, and how it is opened.

The engine uses SQLAlchemy's SQLite dialect on the `sqlcipher3` driver and
gives SQLCipher a raw 256-bit key in a connect event (the `pysqlcipher`
dialect only accepts a passphrase in the URL, which would put a secret in a
string that SQLAlchemy may log and would add SQLCipher's own PBKDF2 on top of
our Argon2id). The key is checked before any other statement runs, so a wrong
key never writes to the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlcipher3.dbapi2 as sqlcipher
from sqlalchemy import event

__all__ = ["SCHEMA", "DatabaseLocked", "changes", "connect_engine", "match_keys", "meta", "records"]

SCHEMA = sa.MetaData()

meta = sa.Table(
    "meta",
    SCHEMA,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The current state of each record: its document and, per field path, the
# version (HLC stamp and origin device) that produced the value.
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

# Append-only log of every field change this device made or received. Rows
# with a device_seq are this device's own edits; those above the pushed
# high-water mark form the outbox. `outcome` is the hub's verdict on an own
# edit (NULL until the hub acknowledged it): 'applied', 'superseded',
# 'conflict' or 'quarantined:<reason>'. Received rows carry the hub_seq.
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

# Name match keys, derived at write time, so search is an index lookup.
match_keys = sa.Table(
    "match_keys",
    SCHEMA,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("record_id", sa.Text, primary_key=True, index=True),
    sqlite_with_rowid=False,
)


class DatabaseLocked(RuntimeError):
    """The key does not open this database file (or the file is not a store)."""


def _pragmas(dbapi_conn: Any, key_hex: str | None) -> None:
    # Let SQLAlchemy's `begin` event decide how a transaction starts.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        if key_hex is not None:
            cur.execute(f"PRAGMA key = \"x'{key_hex}'\"")
        try:
            cur.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlcipher.DatabaseError:
            raise DatabaseLocked("the key does not open this store") from None
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")  # losing a write loses a person
        cur.execute("PRAGMA secure_delete = ON")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA busy_timeout = 10000")
    finally:
        cur.close()


def connect_engine(path: Path, key: bytes | None) -> sa.Engine:
    """Open (creating if absent) the store at `path` under `key`.

    `key=None` opens the same schema without SQLCipher encryption; it exists
    only so benchmarks can measure what encryption costs.
    """
    key_hex = key.hex() if key is not None else None
    engine = sa.create_engine(f"sqlite:///{path}", module=sqlcipher, poolclass=sa.pool.NullPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        _pragmas(dbapi_conn, key_hex)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Take the write lock up front: two writers never deadlock mid-way.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    with engine.begin() as conn:
        SCHEMA.create_all(conn)
    return engine


@contextmanager
def private_umask() -> Iterator[None]:
    """Create files readable by the owner only (database, WAL, key file)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
