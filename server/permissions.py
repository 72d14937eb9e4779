"""Who may do what: the one permission table the hub enforces.

`docs/permissions.md` shows it to people; `tests/test_hub_people.py` walks
every route with every role and checks allowed / 401 / 403 against it.
Site scope is separate: a scoped user only ever sees records of their sites
(another site's record is a 404, never the record). A permission in `HUB_WIDE`
reads what no site scope can cut (the audit log names devices, users and
records of every site): only a user with no site scope holds it.
"""

from __future__ import annotations

from enum import StrEnum

from server.accounts import Role

__all__ = ["HUB_WIDE", "PERMISSIONS", "Permission", "is_allowed"]


class Permission(StrEnum):
    RECORDS_READ = "records.read"
    CONFLICTS_READ = "conflicts.read"
    CONFLICTS_RESOLVE = "conflicts.resolve"
    AUDIT_READ = "audit.read"
    DUPLICATES_READ = "duplicates.read"
    DUPLICATES_DECIDE = "duplicates.decide"
    USERS_READ = "users.read"


PERMISSIONS: dict[Permission, frozenset[Role]] = {
    Permission.RECORDS_READ: frozenset(
        {Role.FIELD_WORKER, Role.HUB_OPERATOR, Role.AUDITOR, Role.ADMIN}
    ),
    Permission.CONFLICTS_READ: frozenset({Role.HUB_OPERATOR, Role.AUDITOR, Role.ADMIN}),
    Permission.CONFLICTS_RESOLVE: frozenset({Role.AUDITOR, Role.ADMIN}),
    Permission.AUDIT_READ: frozenset({Role.AUDITOR, Role.ADMIN}),
    Permission.DUPLICATES_READ: frozenset({Role.HUB_OPERATOR, Role.AUDITOR, Role.ADMIN}),
    Permission.DUPLICATES_DECIDE: frozenset({Role.HUB_OPERATOR, Role.ADMIN}),
    Permission.USERS_READ: frozenset({Role.ADMIN}),
}

HUB_WIDE: frozenset[Permission] = frozenset({Permission.AUDIT_READ})


def is_allowed(role: Role, permission: Permission) -> bool:
    return role in PERMISSIONS[permission]
