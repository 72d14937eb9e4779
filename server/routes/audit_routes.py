"""The audit log for auditors and admins with no site scope (it is hub-wide and holds
no identifying values)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from server import audit
from server.accounts import UserInfo
from server.permissions import Permission
from server.routes.deps import NO_CONTROL, HubDep, Offset, require

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")
AuditReader = Annotated[UserInfo, Depends(require(Permission.AUDIT_READ))]


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    request_id: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@router.get("/audit", response_model=list[AuditEntryPublic])
def list_audit(
    user: AuditReader,
    hub: HubDep,
    actor: Annotated[str | None, Query(max_length=128, pattern=NO_CONTROL)] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> list[AuditEntryPublic]:
    """Newest entries first (403 to a user scoped to sites); `fieldreg-hub audit verify`
    proves the chain."""
    with hub.engine.connect() as conn:
        entries = audit.recent(conn, limit=limit, offset=offset, actor=actor, action=action)
    return [AuditEntryPublic.model_validate(e) for e in entries]
