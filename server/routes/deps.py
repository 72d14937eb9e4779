"""Dependencies shared by routes, written once: the hub, the request id, and
the current user with the permission a route needs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import OAuth2PasswordBearer

from server import accounts
from server.accounts import UserInfo
from server.hub import Hub
from server.permissions import HUB_WIDE, Permission, is_allowed
from server.problems import Problem

__all__ = [
    "NO_CONTROL",
    "CurrentUser",
    "HubDep",
    "ItemId",
    "Offset",
    "RequestId",
    "get_hub",
    "require",
]

oauth2 = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)

# Text parameters never carry control characters (PostgreSQL cannot even store
# U+0000); ids and offsets stay within what both databases hold.
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"
ItemId = Annotated[int, Path(ge=1, le=2**31 - 1, description="an id as listed")]  # INTEGER keys
Offset = Annotated[int, Query(ge=0, le=1_000_000)]


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


HubDep = Annotated[Hub, Depends(get_hub)]


def request_id(request: Request) -> str:
    """This request's id, as `server.app.EchoRequestId` chose it (the caller's
    X-Request-ID if sane, else a new one) and echoes it on the answer."""
    rid = getattr(request.state, "request_id", None)
    if not rid:  # an app built without the middleware
        rid = request.state.request_id = uuid.uuid4().hex
    return str(rid)


RequestId = Annotated[str, Depends(request_id)]


def current_user(hub: HubDep, token: Annotated[str | None, Depends(oauth2)]) -> UserInfo:
    if not token:
        raise Problem(
            401,
            "auth.required",
            "log in first: POST /api/v1/auth/token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with hub.engine.begin() as conn:
        user = accounts.user_for_token(conn, token, now=datetime.now(UTC))
    if user is None:
        raise Problem(
            401,
            "auth.invalid_token",
            "the token is unknown, expired or revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


CurrentUser = Annotated[UserInfo, Depends(current_user)]


def require(permission: Permission) -> Callable[[UserInfo], UserInfo]:
    """A dependency: the current user, if their role has `permission` and, for a
    `HUB_WIDE` one, they have no site scope (else 403)."""

    def check(user: CurrentUser) -> UserInfo:
        if not is_allowed(user.role, permission):
            raise Problem(403, "auth.forbidden", f"a {user.role.value} may not {permission.value}")
        if permission in HUB_WIDE and not user.is_global:
            raise Problem(
                403,
                "auth.forbidden",
                f"{permission.value} covers every site: a {user.role.value} scoped to"
                " sites may not have it",
            )
        return user

    return check
