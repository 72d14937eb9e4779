"""Records and conflicts for people with accounts. Every read of identifying
data and every decision is written to the audit log."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.enums import Need, Scenario, Vulnerability
from server import conflict_review, people
from server.accounts import UserInfo
from server.permissions import Permission
from server.problems import Problem
from server.routes.deps import NO_CONTROL, HubDep, ItemId, Offset, RequestId, require

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")
Reader = Annotated[UserInfo, Depends(require(Permission.RECORDS_READ))]
ConflictReader = Annotated[UserInfo, Depends(require(Permission.CONFLICTS_READ))]
Resolver = Annotated[UserInfo, Depends(require(Permission.CONFLICTS_RESOLVE))]


# A calendar day as text, parsed strictly by `_day` (pydantic's date would take
# 0 as a timestamp); the schema says format `date`.
DayQuery = Query(max_length=10, description="YYYY-MM-DD", json_schema_extra={"format": "date"})


def _day(name: str, text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise Problem(422, "request.invalid", f"{name}: {text!r} is not a calendar day") from None


def _scope(user: UserInfo) -> frozenset[str] | None:
    return None if user.is_global else user.sites


class RecordSummaryPublic(BaseModel):
    id: str
    site: str
    name: str
    scenario: str | None
    sex: str | None
    age_band: str
    nationalities: list[str]
    vulnerabilities: list[str]
    needs: list[str]
    registered_at: datetime | None
    score: float | None = None


class FieldHistoryPublic(BaseModel):
    field: str
    value: Any
    stamp: str
    device_id: str
    operator: str
    received_at: datetime
    hub_seq: int
    outcome: str
    is_current: bool


class RecordPublic(BaseModel):
    record: RecordSummaryPublic
    fields: dict[str, Any]
    history: list[FieldHistoryPublic]


@router.get("/records", response_model=list[RecordSummaryPublic])
def list_records(
    user: Reader,
    hub: HubDep,
    rid: RequestId,
    site: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL)] = None,
    scenario: Scenario | None = None,
    vulnerability: Vulnerability | None = None,
    need: Need | None = None,
    nationality: Annotated[str | None, Query(pattern=r"^[A-Z]{3}$")] = None,
    registered_from: Annotated[str | None, DayQuery] = None,
    registered_to: Annotated[str | None, DayQuery] = None,
    q: Annotated[
        str | None,
        Query(min_length=1, max_length=200, pattern=NO_CONTROL, description="a name, any script"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Offset = 0,
) -> list[RecordSummaryPublic]:
    """Records within your sites matching every filter; `q` searches names across spellings."""
    flt = people.PersonFilter(
        sites=_scope(user),
        site=site,
        scenario=scenario.value if scenario else None,
        vulnerability=vulnerability.value if vulnerability else None,
        need=need.value if need else None,
        nationality=nationality,
        registered_from=_day("registered_from", registered_from),
        registered_to=_day("registered_to", registered_to),
        text=q,
        limit=limit,
        offset=offset,
    )
    with hub.engine.begin() as conn:
        rows = people.list_people(conn, flt, master_key=hub.secrets.master_key)
        action = "records.search" if q else "records.list"
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action=action,
            target=f"records:{len(rows)}",
            request_id=rid,
        )
    return [RecordSummaryPublic.model_validate(r, from_attributes=True) for r in rows]


@router.get("/records/{record_id}", response_model=RecordPublic)
def get_record(
    record_id: Annotated[str, Path(max_length=36, pattern=NO_CONTROL)],
    user: Reader,
    hub: HubDep,
    rid: RequestId,
) -> RecordPublic:
    """One record with every value of every field: who, from which device, when."""
    with hub.engine.begin() as conn:
        view = people.get_person(
            conn, record_id, sites=_scope(user), master_key=hub.secrets.master_key
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="records.view",
            target=f"record:{record_id}",
            request_id=rid,
        )
    return RecordPublic(
        record=RecordSummaryPublic.model_validate(view.row, from_attributes=True),
        fields=view.fields,
        history=[FieldHistoryPublic.model_validate(h, from_attributes=True) for h in view.history],
    )


class ConflictSummaryPublic(BaseModel):
    id: int
    record_id: str
    site: str
    field: str
    status: str
    opened_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


class ConflictPublic(BaseModel):
    conflict: ConflictSummaryPublic
    base: dict[str, Any] | None
    current: dict[str, Any]
    incoming: dict[str, Any]
    provisional_winner: str
    field_now: dict[str, Any] | None
    resolution: dict[str, Any] | None


class _KeepSide(BaseModel):
    """Keep the value one side of the conflict holds."""

    model_config = ConfigDict(extra="forbid")  # in the schema too: no value here

    choice: Literal["current", "incoming"] = Field(description="keep this side's value")
    reason: str = Field(min_length=3, max_length=2000)

    @model_validator(mode="before")
    @classmethod
    def _no_value(cls, data: Any) -> Any:
        if isinstance(data, dict) and "value" in data:
            raise ValueError(
                f"value goes with choice 'value' only; choice {data.get('choice')!r} keeps that"
                " side's value: leave value out, or choose 'value'"
            )
        return data


class _NewValue(BaseModel):
    """Give the field a new value."""

    choice: Literal["value"] = Field(description="give a new value")
    value: Any = Field(default=None, description="the new value")
    reason: str = Field(min_length=3, max_length=2000)


ResolveIn = Annotated[_KeepSide | _NewValue, Field(discriminator="choice")]
"""Keep a side, or give a new value (`value` only with choice 'value')."""


class ReopenIn(BaseModel):
    reason: str = Field(min_length=3, max_length=2000)


class ResolvedPublic(BaseModel):
    conflict_id: int
    hub_seq: int


@router.get("/conflicts", response_model=list[ConflictSummaryPublic])
def list_conflicts(
    user: ConflictReader,
    hub: HubDep,
    status: Annotated[str | None, Query(pattern=r"^(open|resolved)$")] = "open",
    field: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL)] = None,
    site: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> list[ConflictSummaryPublic]:
    """Conflicts within your sites (no values: open one to see both sides)."""
    with hub.engine.connect() as conn:
        found = conflict_review.list_conflicts(
            conn,
            sites=_scope(user),
            status=status,
            field=field,
            site=site,
            limit=limit,
            offset=offset,
        )
    return [ConflictSummaryPublic.model_validate(c, from_attributes=True) for c in found]


@router.get("/conflicts/{conflict_id}", response_model=ConflictPublic)
def get_conflict(
    conflict_id: ItemId, user: ConflictReader, hub: HubDep, rid: RequestId
) -> ConflictPublic:
    """Both competing values side by side with their authors, devices and stamps."""
    with hub.engine.begin() as conn:
        d = conflict_review.get_conflict(
            conn, conflict_id, sites=_scope(user), master_key=hub.secrets.master_key
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="conflicts.view",
            target=f"conflict:{conflict_id}",
            request_id=rid,
        )
    return ConflictPublic(
        conflict=ConflictSummaryPublic.model_validate(d.summary, from_attributes=True),
        base=d.base,
        current=d.current,
        incoming=d.incoming,
        provisional_winner=d.provisional_winner,
        field_now=d.field_now,
        resolution=d.resolution,
    )


@router.post("/conflicts/{conflict_id}/resolve", response_model=ResolvedPublic)
def resolve_conflict(
    conflict_id: ItemId, body: ResolveIn, user: Resolver, hub: HubDep, rid: RequestId
) -> ResolvedPublic:
    """Decide: keep one side or enter a new value, with a reason. Devices get it on pull."""
    now = datetime.now(UTC)
    with hub.engine.begin() as conn:
        seq = conflict_review.resolve(
            conn,
            conflict_id,
            sites=_scope(user),
            choice=body.choice,
            value=body.value if isinstance(body, _NewValue) else None,
            reason=body.reason,
            actor=f"user:{user.name}",
            clock=hub.clock,
            master_key=hub.secrets.master_key,
            now=now,
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="conflicts.resolve",
            target=f"conflict:{conflict_id}",
            request_id=rid,
            detail={"choice": body.choice, "hub_seq": seq},
        )
    return ResolvedPublic(conflict_id=conflict_id, hub_seq=seq)


@router.post("/conflicts/{conflict_id}/reopen", response_model=ConflictSummaryPublic)
def reopen_conflict(
    conflict_id: ItemId, body: ReopenIn, user: Resolver, hub: HubDep, rid: RequestId
) -> ConflictSummaryPublic:
    """Open a resolved conflict again (the resolution stays in the history)."""
    with hub.engine.begin() as conn:
        summary = conflict_review.reopen(
            conn,
            conflict_id,
            sites=_scope(user),
            reason=body.reason,
            actor=f"user:{user.name}",
            master_key=hub.secrets.master_key,
            now=datetime.now(UTC),
        )
        hub.audit(
            conn,
            actor=f"user:{user.name}",
            action="conflicts.reopen",
            target=f"conflict:{conflict_id}",
            request_id=rid,
        )
    return ConflictSummaryPublic.model_validate(summary, from_attributes=True)
