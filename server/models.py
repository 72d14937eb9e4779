"""The hub's tables (SQLModel). Alembic migrations in `server/migrations` create them.

Identifying data lives only in sealed columns (`state`, `sealed`, `payload`):
AES-GCM under the record's data key. Clear columns hold what statistics need
(site, scenario, sex, age band, nationalities, vulnerabilities, needs) and
sync bookkeeping.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = [
    "AuditCheckpoint",
    "AuditEntry",
    "Batch",
    "BlockKey",
    "ChangeRow",
    "ConflictRow",
    "DedupPending",
    "Device",
    "DuplicatePair",
    "EnrolCode",
    "HubMeta",
    "MatchProfile",
    "NameKey",
    "QuarantineRow",
    "RecordRow",
    "ReleasedEdit",
    "Session",
    "User",
    "as_utc",
]


def as_utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands them back naive)."""
    return None if value is None else value if value.tzinfo else value.replace(tzinfo=UTC)


class HubMeta(SQLModel, table=True):
    __tablename__ = "hub_meta"
    key: str = Field(primary_key=True, max_length=64)
    value: str


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    role: str = Field(max_length=32)
    sites: str = Field(default="[]", description="JSON list; empty for global roles")
    password_hash: str
    is_active: bool = True
    created_at: datetime
    failed_logins: int = 0
    locked_until: datetime | None = None


class Session(SQLModel, table=True):
    """An opaque bearer token, stored only as its SHA-256; revocable and expiring."""

    __tablename__ = "sessions"
    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="users.id", index=True)
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


class AuditEntry(SQLModel, table=True):
    """One hash-chained entry: `hash` covers the previous entry's hash and this
    entry's content, so editing, deleting or reordering any row breaks the chain."""

    __tablename__ = "audit_log"
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    at: datetime
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64, index=True)
    target: str = Field(max_length=128)
    request_id: str = Field(max_length=64)
    detail: str = Field(default="{}", description="JSON; never identifying values")
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """The hub's Ed25519 signature over the chain up to `entry_id`."""

    __tablename__ = "audit_checkpoints"
    id: int | None = Field(default=None, primary_key=True)
    entry_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    entry_hash: str = Field(max_length=64)
    at: datetime
    signature: str = Field(max_length=128)


class EnrolCode(SQLModel, table=True):
    __tablename__ = "enrol_codes"
    code_hash: str = Field(primary_key=True, max_length=64)
    sites: str = Field(description="JSON list; the device's own site must be one of them")
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    used_by: str | None = Field(default=None, max_length=64)


class Device(SQLModel, table=True):
    __tablename__ = "devices"
    id: str = Field(primary_key=True, max_length=64)
    sites: str = Field(description="JSON list of the sites this device serves")
    public_keys: str = Field(description="JSON of sync.keys.PublicKeys")
    enrolled_at: datetime
    last_contact_at: datetime | None = None
    high_water: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    clock_offset_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class Batch(SQLModel, table=True):
    """Every push batch applied, with the acknowledgement sent, so a retry gets it again."""

    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("device_id", "batch_id"),)
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, index=True)
    batch_id: str = Field(max_length=128)
    digest: str = Field(max_length=64)
    seq_first: int = Field(sa_column=Column(BigInteger, nullable=False))
    seq_last: int = Field(sa_column=Column(BigInteger, nullable=False))
    received_at: datetime
    ack: str = Field(description="JSON acknowledgement body")


class RecordRow(SQLModel, table=True):
    __tablename__ = "records"
    id: str = Field(primary_key=True, max_length=36)
    site: str = Field(max_length=64, index=True)
    scenario: str | None = Field(default=None, max_length=64, index=True)
    sex: str | None = Field(default=None, max_length=16)
    age_band: str = Field(default="unknown", max_length=16)
    nationalities: str = Field(default="[]")
    vulnerabilities: str = Field(default="[]")
    needs: str = Field(default="[]")
    registered_at: datetime | None = None
    schema_version: int = 1
    wrapped_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    last_hub_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    updated_at: datetime


class NameKey(SQLModel, table=True):
    """Blind index of name match keys: HMAC of each key under a key derived from
    the master key, so the hub can search names without storing them in clear."""

    __tablename__ = "name_keys"
    key_hash: str = Field(primary_key=True, max_length=32)
    record_id: str = Field(primary_key=True, max_length=36, index=True)


class BlockKey(SQLModel, table=True):
    """Blind index of duplicate-detection blocking keys (see `schemas.matching`)."""

    __tablename__ = "block_keys"
    key_hash: str = Field(primary_key=True, max_length=32)
    record_id: str = Field(primary_key=True, max_length=36, index=True)


class MatchProfile(SQLModel, table=True):
    """The duplicate check's profile of a record, sealed under the record's own
    data key (like its `state`: erasing the record's key erases this too), valid
    while `profile_seq` equals the record's `last_hub_seq` (server/dedup_check.py).

    A narrow table of its own: a check reads the profiles of a few hundred
    candidates, and here they lie a dozen to a page instead of one a page of
    `records`."""

    __tablename__ = "match_profiles"
    record_id: str = Field(primary_key=True, max_length=36)
    profile_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class DedupPending(SQLModel, table=True):
    """Records a push changed that the duplicate check has not seen yet.

    Written in the push's transaction, so a crash between the push and the
    check loses nothing; emptied by `server.dedup_worker`."""

    __tablename__ = "dedup_pending"
    record_id: str = Field(primary_key=True, max_length=36)
    queued_at: datetime


class DuplicatePair(SQLModel, table=True):
    """Two registrations that may be one person, queued for a hub operator.

    No names and no explanation are stored: the explanation is recomputed from
    both records when someone opens the pair. A rejected pair is remembered
    and never queued again.
    """

    __tablename__ = "duplicates"
    __table_args__ = (UniqueConstraint("record_a", "record_b"),)
    id: int | None = Field(default=None, primary_key=True)
    record_a: str = Field(max_length=36, index=True)
    record_b: str = Field(max_length=36, index=True)
    site_a: str = Field(max_length=64)
    site_b: str = Field(max_length=64)
    score: float
    status: str = Field(default="open", max_length=16, index=True)
    created_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = Field(default=None, max_length=128)
    survivor: str | None = Field(default=None, max_length=36)
    decision: bytes | None = Field(
        default=None, sa_column=Column(LargeBinary), description="sealed under the survivor's key"
    )


class ChangeRow(SQLModel, table=True):
    """The append-only change log: one row per edit (one record, one stamp, one author).

    `hub_seq` orders the log; pull pages read it. `outcomes` (clear, JSON) names
    each field that did not simply apply (lost to a later stamp, a conflict,
    a duplicate; "hub" for an operator's edit) with what happened to it; a
    field it does not name was applied, so most rows hold `{}`.
    """

    __tablename__ = "changes"
    __table_args__ = (Index("ix_changes_site_seq", "site", "hub_seq"),)
    hub_seq: int | None = Field(
        default=None,
        # SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    record_id: str = Field(max_length=36, index=True)
    site: str = Field(max_length=64)
    device_id: str = Field(max_length=64)
    device_seq: int | None = Field(default=None, sa_column=Column(BigInteger))
    stamp: str = Field(max_length=32)
    operator: str = Field(max_length=200)
    batch_id: str | None = Field(default=None, max_length=128)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    outcomes: str
    received_at: datetime


class ConflictRow(SQLModel, table=True):
    """Two concurrent writes to one field: both kept, the higher applied provisionally."""

    __tablename__ = "conflicts"
    id: int | None = Field(default=None, primary_key=True)
    record_id: str = Field(max_length=36, index=True)
    site: str = Field(max_length=64, index=True)
    field: str = Field(max_length=64)
    status: str = Field(default="open", max_length=16, index=True)
    winner_stamp: str = Field(max_length=32)
    winner_device: str = Field(max_length=64)
    loser_stamp: str = Field(max_length=32)
    loser_device: str = Field(max_length=64)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    opened_at: datetime
    opened_by_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    resolved_at: datetime | None = None
    resolved_by: str | None = Field(default=None, max_length=128)
    resolution: bytes | None = Field(
        default=None, sa_column=Column(LargeBinary), description="sealed: value chosen, reason"
    )
    resolution_seq: int | None = Field(default=None, sa_column=Column(BigInteger))


class QuarantineRow(SQLModel, table=True):
    """What the hub received but would not apply, with why. Never applied, never dropped."""

    __tablename__ = "quarantine"
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, index=True)
    batch_id: str | None = Field(default=None, max_length=128)
    reason: str = Field(max_length=64)
    # The record of a quarantined edit (None for a whole envelope): edits to a
    # record not registered yet are applied when it is (`ingest.apply_parked`).
    record_id: str | None = Field(default=None, max_length=36, index=True)
    detail: str
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    is_sealed_envelope: bool
    received_at: datetime


class ReleasedEdit(SQLModel, table=True):
    """An edit parked as `record.unknown` and applied once its record arrived
    (`ingest.apply_parked`): the change-log row that applied it, and the
    device sequences it covers. Pull pages tell the device that sent it (its
    own edits never travel back), so it stops counting them as quarantined."""

    __tablename__ = "released_edits"
    device_id: str = Field(primary_key=True, max_length=64)
    hub_seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    first_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
