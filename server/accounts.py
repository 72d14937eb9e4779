"""People who log in to the hub: users, roles, site scopes, sessions, lockout. The SQL."""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError

from schemas.record import SiteCode
from server.models import Session, User, as_utc
from server.passwords import hash_password, verify_password
from server.problems import Problem

__all__ = [
    "MAX_FAILED_LOGINS",
    "PasswordCheck",
    "Role",
    "UserInfo",
    "add_user",
    "authenticate",
    "check_password",
    "get_user",
    "list_users",
    "login",
    "logout",
    "password_hash",
    "set_active",
    "set_password",
    "site_code_error",
    "user_for_token",
    "user_name_error",
]

users = User.__table__  # type: ignore[attr-defined]
sessions = Session.__table__  # type: ignore[attr-defined]

MAX_FAILED_LOGINS = 5
LOCK_FOR = timedelta(minutes=15)
SESSION_FOR = timedelta(hours=8)
MIN_PASSWORD_CHARS = 12
MAX_USER_NAME_CHARS = 128
_SITE_CODE: TypeAdapter[str] = TypeAdapter(SiteCode)


def user_name_error(name: str) -> str | None:
    """Why `name` cannot be a user name, or None. The one rule: adding a user
    (CLI, `init --admin`) and logging in apply it alike."""
    if not name.strip():
        return "a user name cannot be empty"
    if len(name) > MAX_USER_NAME_CHARS:
        return f"a user name is at most {MAX_USER_NAME_CHARS} characters"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):  # C0, DEL, C1
        return "a user name cannot hold control characters"
    return None


def site_code_error(site: str) -> str | None:
    """Why `site` is not a site code, or None: the rule records and devices follow."""
    try:
        _SITE_CODE.validate_python(site)
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"])
    return None


class Role(StrEnum):
    FIELD_WORKER = "field_worker"
    HUB_OPERATOR = "hub_operator"
    AUDITOR = "auditor"
    ADMIN = "admin"


GLOBAL_CAPABLE = frozenset({Role.AUDITOR, Role.ADMIN})


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: Role
    sites: frozenset[str]
    is_active: bool
    locked_until: datetime | None

    @property
    def is_global(self) -> bool:
        """Admins and auditors with no sites listed see every site."""
        return self.role in GLOBAL_CAPABLE and not self.sites

    def can_see_site(self, site: str) -> bool:
        return self.is_global or site in self.sites


def _info(row: sa.Row[object]) -> UserInfo:
    m = row._mapping
    return UserInfo(
        id=m["id"],
        name=m["name"],
        role=Role(m["role"]),
        sites=frozenset(json.loads(m["sites"])),
        is_active=m["is_active"],
        locked_until=as_utc(m["locked_until"]),
    )


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise Problem(
            422, "user.weak_password", f"a password needs at least {MIN_PASSWORD_CHARS} characters"
        )


def add_user(
    conn: sa.Connection, *, name: str, role: Role, sites: list[str], password: str, now: datetime
) -> UserInfo:
    """Create a user; field workers and hub operators must name at least one site."""
    problem = user_name_error(name)
    if problem:
        raise Problem(422, "user.invalid_name", f"{name!r}: {problem}")
    for site in sites:
        problem = site_code_error(site)
        if problem:
            raise Problem(422, "user.invalid_site", f"--site: {problem}")
    check_password_strength(password)
    if role not in GLOBAL_CAPABLE and not sites:
        raise Problem(
            422, "user.sites_required", f"a {role.value} must be given at least one --site"
        )
    exists = Problem(409, "user.exists", f"a user named {name!r} exists")
    if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
        raise exists
    try:
        conn.execute(
            sa.insert(users).values(
                name=name,
                role=role.value,
                sites=json.dumps(sorted(set(sites))),
                password_hash=hash_password(password),
                is_active=True,
                created_at=now,
                failed_logins=0,
            )
        )
    except sa.exc.IntegrityError:
        # Added by another transaction since the check (PostgreSQL: the caller's
        # transaction is aborted, and rolls back as the Problem leaves it).
        raise exists from None
    user = get_user(conn, name)
    assert user is not None
    return user


def get_user(conn: sa.Connection, name: str) -> UserInfo | None:
    row = conn.execute(sa.select(users).where(users.c.name == name)).first()
    return None if row is None else _info(row)


def list_users(conn: sa.Connection) -> list[UserInfo]:
    return [_info(r) for r in conn.execute(sa.select(users).order_by(users.c.name))]


def set_active(conn: sa.Connection, name: str, *, is_active: bool) -> UserInfo:
    """Enable or disable a user; disabling also ends every session of theirs."""
    user = get_user(conn, name)
    if user is None:
        raise Problem(404, "user.unknown", f"no user {name!r}")
    conn.execute(sa.update(users).where(users.c.id == user.id).values(is_active=is_active))
    if not is_active:
        conn.execute(
            sa.update(sessions)
            .where(sessions.c.user_id == user.id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
    updated = get_user(conn, name)
    assert updated is not None
    return updated


def set_password(conn: sa.Connection, name: str, password: str) -> None:
    """Reset a password; clears the lockout and ends existing sessions."""
    check_password_strength(password)
    user = get_user(conn, name)
    if user is None:
        raise Problem(404, "user.unknown", f"no user {name!r}")
    conn.execute(
        sa.update(users)
        .where(users.c.id == user.id)
        .values(password_hash=hash_password(password), failed_logins=0, locked_until=None)
    )
    conn.execute(
        sa.update(sessions)
        .where(sessions.c.user_id == user.id, sessions.c.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


@dataclass(frozen=True)
class LoginOutcome:
    user: UserInfo | None
    failed_logins: int
    locked_until: datetime | None


@dataclass(frozen=True)
class PasswordCheck:
    """A password checked against the hash a user had (None: no such user)."""

    password_hash: str | None
    matches: bool


def password_hash(conn: sa.Connection, name: str) -> str | None:
    """The user's stored password hash (None: no such user), for `check_password`."""
    stmt = sa.select(users.c.password_hash).where(users.c.name == name)
    hashed: str | None = conn.execute(stmt).scalar_one_or_none()
    return hashed


def check_password(password: str, stored: str | None) -> PasswordCheck:
    """Run Argon2id on `password` against `stored` (from `password_hash`).

    Call it holding no transaction and no connection: the derivation takes a
    large fraction of a second, on SQLite any open transaction holds the write
    lock (`BEGIN IMMEDIATE`) and would stall every push for that long, and
    logins waiting their turn for Argon2 (`server.passwords`) would each hold
    a pooled connection. An unknown name (`stored` None) costs the same work
    as a known one, so timing does not tell which names exist.
    """
    return PasswordCheck(stored, verify_password(password, stored or _dummy_hash()))


def authenticate(
    conn: sa.Connection, name: str, password: str, checked: PasswordCheck, *, now: datetime
) -> LoginOutcome:
    """Settle a login `check_password` checked, counting failures and locking
    after `MAX_FAILED_LOGINS`.

    Locks the user's row until the caller commits (on SQLite `BEGIN
    IMMEDIATE` already did): attempts at once each count from the number the
    one before left, so the account locks on time. A lock set while the
    password was being checked wins; a password changed meanwhile is checked
    again (under the lock: rare).
    """
    stmt = sa.select(users).where(users.c.name == name).with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        return LoginOutcome(None, 0, None)
    user = _info(row)
    if user.locked_until and user.locked_until > now:
        return LoginOutcome(None, row.failed_logins, user.locked_until)
    matches = (
        checked.matches
        if checked.password_hash == row.password_hash
        else verify_password(password, row.password_hash)
    )
    if matches and user.is_active:
        conn.execute(
            sa.update(users).where(users.c.id == user.id).values(failed_logins=0, locked_until=None)
        )
        return LoginOutcome(user, 0, None)
    failures = row.failed_logins + 1
    locked = now + LOCK_FOR if failures >= MAX_FAILED_LOGINS else None
    conn.execute(
        sa.update(users)
        .where(users.c.id == user.id)
        .values(failed_logins=0 if locked else failures, locked_until=locked)
    )
    return LoginOutcome(None, failures, locked)


def login(conn: sa.Connection, user: UserInfo, *, now: datetime) -> tuple[str, int]:
    """A new opaque bearer token (returned once, stored hashed) and its lifetime in s."""
    token = secrets.token_urlsafe(32)
    conn.execute(
        sa.insert(sessions).values(
            token_hash=_token_hash(token),
            user_id=user.id,
            created_at=now,
            expires_at=now + SESSION_FOR,
        )
    )
    return token, int(SESSION_FOR.total_seconds())


def user_for_token(conn: sa.Connection, token: str, *, now: datetime) -> UserInfo | None:
    """The active user behind a live token, or None."""
    stmt = (
        sa.select(users, sessions.c.expires_at, sessions.c.revoked_at)
        .join(sessions, sessions.c.user_id == users.c.id)
        .where(sessions.c.token_hash == _token_hash(token))
    )
    row = conn.execute(stmt).first()
    if row is None or row.revoked_at is not None:
        return None
    expires = as_utc(row.expires_at)
    if expires is None or expires <= now or not row.is_active:
        return None
    return _info(row)


def logout(conn: sa.Connection, token: str, *, now: datetime) -> None:
    conn.execute(
        sa.update(sessions)
        .where(sessions.c.token_hash == _token_hash(token), sessions.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


@functools.cache
def _dummy_hash() -> str:
    return hash_password("timing-equaliser-not-a-real-password")
