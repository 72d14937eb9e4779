"""Opening the hub database: SQLite (default) or PostgreSQL, set up on purpose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

__all__ = ["is_sqlite", "make_engine", "migrate", "write_lock"]

MIGRATIONS = Path(__file__).parent / "migrations"


def _normalise(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, busy_timeout_s: float = 30.0, mmap_mb: int = 0) -> sa.Engine:
    """An engine for `url`. SQLite gets WAL, synchronous=FULL, foreign keys, and
    `BEGIN IMMEDIATE` so a writer holds the lock from its first statement.

    A transaction waits at most `busy_timeout_s` for a lock (SQLite's write
    lock, PostgreSQL's locks); then the statement fails with SQLAlchemy's
    `OperationalError`, which the HTTP app answers with 503 and the CLIs
    with one line. On SQLite up to `mmap_mb` MiB of the file are read through
    a memory map (`PRAGMA mmap_size`).
    """
    url = _normalise(url)
    timeout_ms = int(busy_timeout_s * 1000)
    if not url.startswith("sqlite"):
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=5,
            connect_args={"options": f"-c lock_timeout={timeout_ms}"},
        )
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute(f"PRAGMA busy_timeout = {timeout_ms}")
        cur.execute(f"PRAGMA mmap_size = {int(mmap_mb) * 2**20}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def write_lock(conn: sa.Connection) -> None:
    """Serialise writers that assign hub sequence numbers.

    On SQLite `BEGIN IMMEDIATE` already did. On PostgreSQL a transaction-level
    advisory lock makes hub_seq order equal commit order, so a pull never skips
    a change that commits later with a lower number.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7301)")


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the latest Alembic revision (idempotent)."""
    from alembic import command  # only here: importing Alembic costs every process start
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
