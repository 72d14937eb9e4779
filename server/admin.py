"""Hub administration on the hub machine itself: initialisation, the first
admin, and the read-outs `fieldreg-hub` prints (devices, records, conflicts)."""

from __future__ import annotations

import json
import os
import secrets as pysecrets
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from schemas.ids import uuid7
from server import dedup_check
from server import devices as device_store
from server.accounts import user_name_error
from server.db import make_engine, migrate
from server.keystore import HubSecrets
from server.models import ConflictRow, QuarantineRow, RecordRow, User
from server.passwords import hash_password
from server.records import HubRecord
from server.sealing import RecordCipher
from server.settings import HubSettings

__all__ = [
    "ConflictView",
    "RecordView",
    "initialise",
    "list_conflicts",
    "list_quarantine",
    "list_records",
]

users = User.__table__  # type: ignore[attr-defined]
records = RecordRow.__table__  # type: ignore[attr-defined]
conflicts = ConflictRow.__table__  # type: ignore[attr-defined]
quarantine = QuarantineRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    fingerprint: str
    admin: str
    admin_password: str | None


def initialise(settings: HubSettings, *, admin: str, admin_password: str | None) -> InitResult:
    """Create keys, master key, database and the first admin. Refuses an existing hub,
    and an admin name no one could log in with (ValueError, before anything is made).

    All or nothing: when a step fails (the database refuses, a file cannot be
    written, another hub's database), what this call made (key files, a new
    SQLite file, directories) is removed again and the error raised as it was.
    """
    problem = user_name_error(admin)
    if problem:
        raise ValueError(f"--admin {admin!r}: {problem}")
    HubSecrets.check_absent(settings.data_dir)
    made = _Made.before(settings)
    engine: sa.Engine | None = None
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = make_engine(
            settings.resolved_database_url(),
            busy_timeout_s=settings.busy_timeout_s,
            mmap_mb=settings.sqlite_mmap_mb,
        )
        result = _initialise(settings, engine, made, admin=admin, admin_password=admin_password)
    except BaseException:
        if engine is not None:
            engine.dispose()
        made.undo(settings.data_dir)
        raise
    engine.dispose()
    return result


@dataclass
class _Made:
    """What `initialise` made, and so removes when it fails."""

    new_dirs: list[Path]  # data_dir and the parents it creates, deepest first
    new_database: Path | None  # a SQLite file that did not exist
    has_keys: bool = False  # whether it wrote hub.keys and master.key

    @classmethod
    def before(cls, settings: HubSettings) -> _Made:
        new_dirs = [settings.data_dir]
        while not new_dirs[-1].exists() and new_dirs[-1].parent != new_dirs[-1]:
            new_dirs.append(new_dirs[-1].parent)
        url = sa.make_url(settings.resolved_database_url())
        database = url.database if url.get_backend_name() == "sqlite" else None
        file = Path(database) if database and database != ":memory:" else None
        return cls(new_dirs[:-1], file if file is not None and not file.exists() else None)

    def undo(self, data_dir: Path) -> None:
        """Remove what was made; what cannot be removed stays (the error that
        made init fail is the one worth reporting)."""
        if self.has_keys:
            with suppress(OSError):
                HubSecrets.remove(data_dir)
        if self.new_database is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with suppress(OSError):
                    Path(f"{self.new_database}{suffix}").unlink(missing_ok=True)
        for directory in self.new_dirs:
            with suppress(OSError):
                directory.rmdir()  # only when empty: nothing else is taken with it


def _initialise(
    settings: HubSettings,
    engine: sa.Engine,
    made: _Made,
    *,
    admin: str,
    admin_password: str | None,
) -> InitResult:
    old_umask = os.umask(0o077)  # the SQLite file and its WAL: owner only
    try:
        # Another hub's database is refused before any key is made: keys that
        # do not match the database would leave this directory unusable.
        if _holds_hub(engine):
            raise FileExistsError("this database already holds a hub")
        secrets = HubSecrets.create(settings.data_dir)
        made.has_keys = True
        migrate(engine)
    finally:
        os.umask(old_umask)
    generated = admin_password is None
    password = admin_password or pysecrets.token_urlsafe(18)
    with engine.begin() as conn:
        if device_store.get_meta(conn, "epoch") is not None:
            raise FileExistsError("this database already holds a hub")
        device_store.set_meta(conn, "epoch", uuid7().hex)
        device_store.set_meta(conn, "hlc", "0" * 18)
        dedup_check.mark_index_current(conn)  # no record filed yet, by any matcher
        conn.execute(
            sa.insert(users).values(
                name=admin,
                role="admin",
                sites="[]",
                password_hash=hash_password(password),
                is_active=True,
                created_at=datetime.now(UTC),
            )
        )
    return InitResult(
        settings.data_dir,
        secrets.keys.public().fingerprint(),
        admin,
        password if generated else None,
    )


def _holds_hub(engine: sa.Engine) -> bool:
    """Whether the database was initialised as a hub already (its epoch is set)."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(device_store.hub_meta.name):
            return False
        return device_store.get_meta(conn, "epoch") is not None


@dataclass(frozen=True)
class RecordView:
    id: str
    site: str
    name: str
    scenario: str | None
    nationalities: list[str]
    needs: list[str]


def _name(fields: dict[str, Any]) -> str:
    parts = [(fields.get(f) or {}).get("v") for f in ("names.given", "names.family")]
    original = [
        (fields.get(f) or {}).get("v") for f in ("names.given_original", "names.family_original")
    ]
    latin = " ".join(p for p in parts if p)
    script = " ".join(p for p in original if p)
    return f"{latin} ({script})" if latin and script else latin or script or "?"


def list_records(engine: sa.Engine, master_key: bytes, *, limit: int = 100) -> list[RecordView]:
    """Records with their names unsealed (identifying: for the hub operator only)."""
    out = []
    with engine.connect() as conn:
        stmt = sa.select(records).order_by(records.c.registered_at).limit(limit)
        for row in conn.execute(stmt):
            cipher = RecordCipher(master_key, row.id, row.wrapped_key)
            rec = HubRecord(row.id, row.wrapped_key, cipher, cipher.open(row.state, "state"))
            out.append(
                RecordView(
                    row.id,
                    row.site,
                    _name(rec.fields),
                    row.scenario,
                    json.loads(row.nationalities),
                    json.loads(row.needs),
                )
            )
    return out


def names_of(conn: sa.Connection, master_key: bytes, record_ids: set[str]) -> dict[str, str]:
    """Display names of some records, unsealed (identifying: callers audit)."""
    if not record_ids:
        return {}
    stmt = sa.select(records.c.id, records.c.wrapped_key, records.c.state).where(
        records.c.id.in_(sorted(record_ids))
    )
    found = {}
    for row in conn.execute(stmt):
        cipher = RecordCipher(master_key, row.id, row.wrapped_key)
        found[row.id] = _name(cipher.open(row.state, "state"))
    return found


@dataclass(frozen=True)
class ConflictView:
    id: int
    record_id: str
    site: str
    field: str
    status: str
    current: dict[str, Any]
    incoming: dict[str, Any]
    winner_device: str


def list_conflicts(
    engine: sa.Engine, master_key: bytes, *, status: str = "open"
) -> list[ConflictView]:
    """Conflicts with both sides unsealed, each with its record's current site."""
    out = []
    with engine.connect() as conn:
        stmt = (
            sa.select(conflicts, records.c.wrapped_key, records.c.site.label("record_site"))
            .join(records, records.c.id == conflicts.c.record_id)
            .where(conflicts.c.status == status)
            .order_by(conflicts.c.id)
        )
        for row in conn.execute(stmt):
            payload = RecordCipher(master_key, row.record_id, row.wrapped_key).open(
                row.payload, "conflict"
            )
            out.append(
                ConflictView(
                    row.id,
                    row.record_id,
                    row.record_site,
                    row.field,
                    row.status,
                    payload["current"],
                    payload["incoming"],
                    row.winner_device,
                )
            )
    return out


def list_quarantine(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(quarantine).order_by(quarantine.c.id)).all()
    return [
        {
            "id": r.id,
            "device": r.device_id,
            "batch": r.batch_id,
            "reason": r.reason,
            "detail": r.detail,
            "at": r.received_at,
        }
        for r in rows
    ]
