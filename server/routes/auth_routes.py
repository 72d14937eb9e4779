"""Login (OAuth2 password flow), logout, and who am I."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from server import accounts
from server.problems import Problem
from server.routes.deps import CurrentUser, HubDep, RequestId, oauth2

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")
_SLOWDOWN_S = 0.25  # per failed attempt in a row, capped below


class TokenPublic(BaseModel):
    access_token: str
    token_type: str
    expires_in: int


class MePublic(BaseModel):
    name: str
    role: str
    sites: list[str]


@router.post("/auth/token", response_model=TokenPublic)
def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], hub: HubDep, rid: RequestId
) -> TokenPublic:
    """Exchange a user name and password for an opaque bearer token.

    Failed attempts in a row slow the answer down; after five the account is
    locked for 15 minutes (429 `auth.locked`).
    """
    if accounts.user_name_error(form.username):
        raise Problem(422, "request.invalid", "username: not a user name")
    with hub.engine.begin() as conn:
        stored = accounts.password_hash(conn, form.username)
    checked = accounts.check_password(form.password, stored)  # slow: no lock or connection held
    now = datetime.now(UTC)
    with hub.engine.begin() as conn:
        outcome = accounts.authenticate(conn, form.username, form.password, checked, now=now)
        if outcome.user is not None:
            issued, lifetime = accounts.login(conn, outcome.user, now=now)
        hub.audit(
            conn,
            actor=f"user:{form.username}",
            action="auth.login" if outcome.user else "auth.login_failed",
            target=f"user:{form.username}",
            request_id=rid,
        )
    if outcome.locked_until is not None:
        retry = max(1, int((outcome.locked_until - now).total_seconds()))
        raise Problem(
            429,
            "auth.locked",
            "too many failed logins: try again later",
            headers={"Retry-After": str(retry)},
        )
    if outcome.user is None:
        time.sleep(min(2.0, _SLOWDOWN_S * outcome.failed_logins))
        raise Problem(401, "auth.invalid_credentials", "wrong user name or password")
    return TokenPublic(access_token=issued, token_type="bearer", expires_in=lifetime)


@router.post("/auth/logout", status_code=204, response_class=Response)
def logout(
    user: CurrentUser, hub: HubDep, rid: RequestId, raw: Annotated[str | None, Depends(oauth2)]
) -> Response:
    """End this session (the token stops working at once)."""
    assert raw is not None
    with hub.engine.begin() as conn:
        accounts.logout(conn, raw, now=datetime.now(UTC))
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="auth.logout",
            target=f"user:{user.name}",
            request_id=rid,
        )
    return Response(status_code=204)


@router.get("/me", response_model=MePublic)
def me(user: CurrentUser) -> MePublic:
    """The logged-in user: name, role, sites (empty for a global auditor or admin)."""
    return MePublic(name=user.name, role=user.role.value, sites=sorted(user.sites))
