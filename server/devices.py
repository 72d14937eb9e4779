"""Devices, enrolment codes, the hub's own metadata and whole-batch quarantine: the SQL."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from schemas.record import HIDDEN_IN_LINE
from server.db import write_lock
from server.hub_edits import HUB_DEVICE
from server.models import ChangeRow, Device, EnrolCode, HubMeta, QuarantineRow
from server.problems import Problem
from sync.keys import KeyFormatError, PublicKeys

__all__ = [
    "RESERVED_DEVICE_IDS",
    "DeviceInfo",
    "create_enrol_code",
    "get_device",
    "get_meta",
    "last_hub_seq",
    "list_devices",
    "quarantine_envelope",
    "redeem_code",
    "revoke_device",
    "set_meta",
    "touch",
]

MAX_REVOKE_REASON = 500
# Ids no device may take: the hub authors its own edits and signs its envelopes
# as `hub`. A device under that id would never receive hub edits (a device's
# own edits are skipped in its pulls) and its edits would pass for the hub's.
# Compared case-insensitively, so no device reads as the hub in a list either.
RESERVED_DEVICE_IDS = frozenset({HUB_DEVICE})

devices = Device.__table__  # type: ignore[attr-defined]
codes = EnrolCode.__table__  # type: ignore[attr-defined]
hub_meta = HubMeta.__table__  # type: ignore[attr-defined]
quarantine = QuarantineRow.__table__  # type: ignore[attr-defined]
changes = ChangeRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    sites: frozenset[str]
    public_keys: PublicKeys
    enrolled_at: datetime
    last_contact_at: datetime | None
    high_water: int
    clock_offset_ms: int | None
    revoked_at: datetime | None
    revoked_reason: str | None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


def _code_hash(code: str) -> str:
    normalised = code.strip().upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(normalised.encode()).hexdigest()


def _as_utc(value: datetime) -> datetime:
    # SQLite hands datetimes back naive; they were stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def create_enrol_code(
    conn: sa.Connection, *, sites: list[str], valid_for: timedelta, now: datetime
) -> str:
    """A new one-time code for a device serving `sites` (stored hashed); returns the
    code to show once. The device's own site must be one of them."""
    raw = base64.b32encode(os.urandom(15)).decode().rstrip("=")
    code = "-".join(raw[i : i + 6] for i in range(0, 24, 6))
    conn.execute(
        sa.insert(codes).values(
            code_hash=_code_hash(code),
            sites=json.dumps(sorted(set(sites))),
            created_at=now,
            expires_at=now + valid_for,
        )
    )
    return code


def redeem_code(
    conn: sa.Connection,
    *,
    code: str,
    device_id: str,
    site: str,
    public_keys: Mapping[str, Any],
    now: datetime,
) -> tuple[DeviceInfo, bool]:
    """Use an enrolment code to register a device; refuses used, expired or unknown codes.
    Returns the device and whether it is new: the device a code enrolled may
    ask again with the same keys (its answer was lost) and is answered again.

    The code is judged first: a request with a bad code is refused for the code,
    whatever else is wrong with it. Keys that do not parse are a 422 raised
    inside the caller's transaction, so the code is not spent. Takes the write
    lock first: two hub processes redeeming one code at once cannot both see it
    unused (on PostgreSQL the second would otherwise overwrite the first's use).
    """
    write_lock(conn)
    row = conn.execute(sa.select(codes).where(codes.c.code_hash == _code_hash(code))).first()
    if row is None:
        raise Problem(403, "enrol.code_invalid", "this enrolment code is not known")
    if row.used_at is not None:
        again = _asked_again(conn, row.used_by, device_id, public_keys)
        if again is not None:
            return again, False
        raise Problem(403, "enrol.code_invalid", "this enrolment code was already used")
    if _as_utc(row.expires_at) <= now:
        raise Problem(403, "enrol.code_invalid", "this enrolment code has expired")
    code_sites = json.loads(row.sites)
    if site not in code_sites:
        raise Problem(
            409,
            "enrol.site_mismatch",
            f"the code is for site(s) {', '.join(code_sites)}; the device is set up for {site!r}",
        )
    if device_id.casefold() in RESERVED_DEVICE_IDS:
        raise Problem(
            409, "device.id_reserved", f"the device id {device_id!r} is the hub's own; use another"
        )
    if conn.execute(sa.select(devices.c.id).where(devices.c.id == device_id)).first():
        raise Problem(409, "device.exists", "a device with this id is already enrolled")
    try:
        keys = PublicKeys.from_json(dict(public_keys))
    except KeyFormatError as exc:
        raise Problem(422, "request.invalid", f"public_keys: {exc}") from None
    conn.execute(
        sa.update(codes)
        .where(codes.c.code_hash == row.code_hash)
        .values(used_at=now, used_by=device_id)
    )
    conn.execute(
        sa.insert(devices).values(
            id=device_id,
            sites=json.dumps(code_sites),
            public_keys=json.dumps(keys.to_json()),
            enrolled_at=now,
            high_water=0,
        )
    )
    device = get_device(conn, device_id)
    assert device is not None
    return device, True


def _asked_again(
    conn: sa.Connection, used_by: str | None, device_id: str, public_keys: Mapping[str, Any]
) -> DeviceInfo | None:
    """The device a spent code enrolled, when that device asks again with the
    same keys: the answer to its first request was lost on the way, and it
    cannot enrol otherwise (the code is spent, its id taken). Nothing changes;
    a revoked device is not answered."""
    if used_by != device_id:
        return None
    device = get_device(conn, device_id)
    if device is None or device.is_revoked:
        return None
    try:
        keys = PublicKeys.from_json(dict(public_keys))
    except KeyFormatError:
        return None
    return device if keys == device.public_keys else None


def _info(row: sa.Row[object]) -> DeviceInfo:
    m = row._mapping
    return DeviceInfo(
        id=m["id"],
        sites=frozenset(json.loads(m["sites"])),
        public_keys=PublicKeys.from_json(json.loads(m["public_keys"])),
        enrolled_at=_as_utc(m["enrolled_at"]),
        last_contact_at=_as_utc(m["last_contact_at"]) if m["last_contact_at"] else None,
        high_water=m["high_water"],
        clock_offset_ms=m["clock_offset_ms"],
        revoked_at=_as_utc(m["revoked_at"]) if m["revoked_at"] else None,
        revoked_reason=m["revoked_reason"],
    )


def get_device(conn: sa.Connection, device_id: str) -> DeviceInfo | None:
    row = conn.execute(sa.select(devices).where(devices.c.id == device_id)).first()
    return None if row is None else _info(row)


def list_devices(conn: sa.Connection) -> list[DeviceInfo]:
    return [_info(row) for row in conn.execute(sa.select(devices).order_by(devices.c.enrolled_at))]


def touch(conn: sa.Connection, device_id: str, *, now: datetime) -> None:
    """Record that the device was in contact now."""
    conn.execute(sa.update(devices).where(devices.c.id == device_id).values(last_contact_at=now))


def revoke_device(
    conn: sa.Connection, device_id: str, *, reason: str, now: datetime
) -> tuple[DeviceInfo, bool]:
    """Mark a device revoked; its later requests fail with `device.revoked`.
    Returns the device and whether this call revoked it (False: it already
    was, and its first revocation is kept as it was).

    The reason is shown in `device list` and kept for auditors: 1 to
    `MAX_REVOKE_REASON` characters of plain text (Problem 422 otherwise).
    Takes the write lock, so a push being applied finishes first and every
    push applied after this commits sees the revocation (`server.ingest`).
    """
    reason = reason.strip()
    if not reason or len(reason) > MAX_REVOKE_REASON or HIDDEN_IN_LINE.search(reason):
        raise Problem(
            422,
            "device.invalid_reason",
            f"give a reason of 1 to {MAX_REVOKE_REASON} characters on one line, without"
            " control characters",
        )
    write_lock(conn)  # read under it: of two revocations at once, one revokes
    device = get_device(conn, device_id)
    if device is None:
        raise Problem(404, "device.unknown", f"no device {device_id!r}")
    if device.is_revoked:
        return device, False
    conn.execute(
        sa.update(devices)
        .where(devices.c.id == device_id)
        .values(revoked_at=now, revoked_reason=reason)
    )
    revoked = get_device(conn, device_id)
    assert revoked is not None
    return revoked, True


def quarantine_envelope(
    conn: sa.Connection,
    *,
    device_id: str,
    batch_id: str,
    reason: str,
    detail: str,
    envelope: bytes,
    now: datetime,
) -> None:
    """Keep a whole batch the hub refused to apply (still sealed to the hub's key)."""
    conn.execute(
        sa.insert(quarantine).values(
            device_id=device_id,
            batch_id=batch_id,
            reason=reason,
            detail=detail,
            payload=envelope,
            is_sealed_envelope=True,
            received_at=now,
        )
    )


def last_hub_seq(conn: sa.Connection) -> int:
    """The highest hub sequence the change log holds (0 when empty)."""
    stmt = sa.select(sa.func.coalesce(sa.func.max(changes.c.hub_seq), 0))
    return int(conn.execute(stmt).scalar_one())


def get_meta(conn: sa.Connection, key: str) -> str | None:
    return conn.execute(
        sa.select(hub_meta.c.value).where(hub_meta.c.key == key)
    ).scalar_one_or_none()


def set_meta(conn: sa.Connection, key: str, value: str) -> None:
    if get_meta(conn, key) is None:
        conn.execute(sa.insert(hub_meta).values(key=key, value=value))
    else:
        conn.execute(sa.update(hub_meta).where(hub_meta.c.key == key).values(value=value))
