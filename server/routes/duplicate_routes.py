"""The duplicate queue for hub operators: list, explain, merge, reject, unmerge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from server import duplicates
from server.accounts import UserInfo
from server.permissions import Permission
from server.routes.deps import HubDep, ItemId, Offset, RequestId, require

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")
Reader = Annotated[UserInfo, Depends(require(Permission.DUPLICATES_READ))]
Decider = Annotated[UserInfo, Depends(require(Permission.DUPLICATES_DECIDE))]


def _scope(user: UserInfo) -> frozenset[str] | None:
    return None if user.is_global else user.sites


class PairPublic(BaseModel):
    id: int
    record_a: str
    record_b: str
    site_a: str
    site_b: str
    score: float
    status: str
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    survivor: str | None
    explanation: list[dict[str, Any]]
    kept: list[str] = Field(
        default_factory=list,
        description="after an unmerge: fields of the survivor changed since the merge,"
        " left as they are",
    )


class MergeIn(BaseModel):
    survivor: str = Field(min_length=36, max_length=36, description="the record that stays")
    take_from_other: list[str] = Field(
        default_factory=list,
        max_length=40,
        description="fields whose value comes from the other record",
    )


def _public(view: duplicates.PairView) -> PairPublic:
    return PairPublic.model_validate(
        {**view.__dict__, "explanation": list(view.explanation), "kept": list(view.kept)}
    )


@router.get("/duplicates", response_model=list[PairPublic])
def list_duplicates(
    user: Reader,
    hub: HubDep,
    response: Response,
    status: Annotated[str | None, Query(pattern=r"^(open|merged|rejected|unmerged)$")] = "open",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> list[PairPublic]:
    """Possible duplicates within your sites, best score first (open a pair for the why).

    Records pushed moments ago are checked first (for up to 5 s); the
    `Fieldreg-Checks-Pending` header counts those still waiting for the check."""
    response.headers["Fieldreg-Checks-Pending"] = str(hub.checker.check_all_pending(budget_s=5.0))
    with hub.engine.connect() as conn:
        found = duplicates.list_pairs(
            conn, sites=_scope(user), status=status, limit=limit, offset=offset
        )
    return [_public(p) for p in found]


@router.get("/duplicates/{pair_id}", response_model=PairPublic)
def get_duplicate(pair_id: ItemId, user: Reader, hub: HubDep, rid: RequestId) -> PairPublic:
    """One pair with its explanation: which fields agreed and what each weighed."""
    with hub.engine.begin() as conn:
        view = duplicates.get_pair(
            conn,
            pair_id,
            sites=_scope(user),
            master_key=hub.secrets.master_key,
            index=hub.block_index,
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="duplicates.view",
            target=f"pair:{pair_id}",
            request_id=rid,
        )
    return _public(view)


@router.post("/duplicates/{pair_id}/merge", response_model=PairPublic)
def merge_duplicate(
    pair_id: ItemId, body: MergeIn, user: Decider, hub: HubDep, rid: RequestId
) -> PairPublic:
    """One person: link both registrations under `survivor`; nothing is deleted."""
    with hub.engine.begin() as conn:
        view = duplicates.merge(
            conn,
            pair_id,
            sites=_scope(user),
            survivor=body.survivor,
            take_from_other=body.take_from_other,
            actor=f"user:{user.name}",
            clock=hub.clock,
            master_key=hub.secrets.master_key,
            index=hub.block_index,
            now=datetime.now(UTC),
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="duplicates.merge",
            target=f"pair:{pair_id}",
            request_id=rid,
            detail={"survivor": body.survivor, "fields": sorted(body.take_from_other)},
        )
    return _public(view)


@router.post("/duplicates/{pair_id}/reject", response_model=PairPublic)
def reject_duplicate(pair_id: ItemId, user: Decider, hub: HubDep, rid: RequestId) -> PairPublic:
    """Two people: the pair is remembered and not queued again."""
    with hub.engine.begin() as conn:
        view = duplicates.reject(
            conn, pair_id, sites=_scope(user), actor=f"user:{user.name}", now=datetime.now(UTC)
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="duplicates.reject",
            target=f"pair:{pair_id}",
            request_id=rid,
        )
    return _public(view)


@router.post("/duplicates/{pair_id}/unmerge", response_model=PairPublic)
def unmerge_duplicate(pair_id: ItemId, user: Decider, hub: HubDep, rid: RequestId) -> PairPublic:
    """Undo a merge: both registrations are as they were before it."""
    with hub.engine.begin() as conn:
        view = duplicates.unmerge(
            conn,
            pair_id,
            sites=_scope(user),
            actor=f"user:{user.name}",
            clock=hub.clock,
            master_key=hub.secrets.master_key,
            now=datetime.now(UTC),
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="duplicates.unmerge",
            target=f"pair:{pair_id}",
            request_id=rid,
            detail={"kept": list(view.kept)} if view.kept else None,
        )
    return _public(view)
