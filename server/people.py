"""Reading records for people (not devices): lists with filters and search,
one record with its per-field history. The SQL; scope is enforced here too:
a record outside the caller's sites is simply not found."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa

from schemas.names import name_similarity
from server.models import ChangeRow, RecordRow, as_utc
from server.name_index import IndexKey, names_of, search_ids
from server.problems import Problem
from server.sealing import RecordCipher

__all__ = ["FieldHistory", "PersonFilter", "PersonRow", "PersonView", "get_person", "list_people"]

records = RecordRow.__table__  # type: ignore[attr-defined]
changes = ChangeRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PersonFilter:
    sites: frozenset[str] | None  # None: every site (global roles)
    site: str | None = None
    scenario: str | None = None
    vulnerability: str | None = None
    need: str | None = None
    nationality: str | None = None
    registered_from: date | None = None
    registered_to: date | None = None
    text: str | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class PersonRow:
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
    score: float | None


@dataclass(frozen=True)
class FieldHistory:
    field: str
    value: Any
    stamp: str
    device_id: str
    operator: str
    received_at: datetime
    hub_seq: int
    outcome: str
    is_current: bool


@dataclass(frozen=True)
class PersonView:
    row: PersonRow
    fields: dict[str, Any]
    history: list[FieldHistory]


def _display(fields: dict[str, Any]) -> str:
    latin = " ".join(v for p in ("names.given", "names.family") if (v := fields.get(p)))
    script = " ".join(
        v for p in ("names.given_original", "names.family_original") if (v := fields.get(p))
    )
    return f"{latin} ({script})" if latin and script else latin or script or "?"


def _values(master_key: bytes, row: Any) -> dict[str, Any]:
    cipher = RecordCipher(master_key, row.id, row.wrapped_key)
    return {p: f["v"] for p, f in cipher.open(row.state, "state").items()}


def _row(row: Any, fields: dict[str, Any], score: float | None = None) -> PersonRow:
    return PersonRow(
        id=row.id,
        site=row.site,
        name=_display(fields),
        scenario=row.scenario,
        sex=row.sex,
        age_band=row.age_band,
        nationalities=json.loads(row.nationalities),
        vulnerabilities=json.loads(row.vulnerabilities),
        needs=json.loads(row.needs),
        registered_at=as_utc(row.registered_at),
        score=score,
    )


def _contains(column: sa.ColumnElement[str], value: str) -> sa.ColumnElement[bool]:
    # The clear list columns are JSON arrays of vocabulary strings (no quotes inside).
    return column.contains(json.dumps(value))


def list_people(conn: sa.Connection, flt: PersonFilter, *, master_key: bytes) -> list[PersonRow]:
    """Records matching every filter within the caller's sites; names unsealed.

    With `text`, candidates come from the blind name index and are ranked by
    name similarity (best first); otherwise newest registrations first.
    """
    stmt = sa.select(records)
    if flt.sites is not None:
        stmt = stmt.where(records.c.site.in_(sorted(flt.sites)))
    if flt.site:
        stmt = stmt.where(records.c.site == flt.site)
    if flt.scenario:
        stmt = stmt.where(records.c.scenario == flt.scenario)
    for column, value in (
        (records.c.vulnerabilities, flt.vulnerability),
        (records.c.needs, flt.need),
        (records.c.nationalities, flt.nationality),
    ):
        if value:
            stmt = stmt.where(_contains(column, value))
    if flt.registered_from:
        start = datetime.combine(flt.registered_from, time.min, tzinfo=UTC)
        stmt = stmt.where(records.c.registered_at >= start)
    # The last calendar day has no next day to stop before: no upper bound then,
    # but a record whose registration time is unknown is on no day.
    if flt.registered_to and flt.registered_to < date.max:
        end = datetime.combine(flt.registered_to + timedelta(days=1), time.min, tzinfo=UTC)
        stmt = stmt.where(records.c.registered_at < end)
    elif flt.registered_to:
        stmt = stmt.where(records.c.registered_at.is_not(None))
    if not flt.text:
        stmt = (
            stmt.order_by(records.c.registered_at.desc(), records.c.id)
            .limit(flt.limit)
            .offset(flt.offset)
        )
        return [_row(r, _values(master_key, r)) for r in conn.execute(stmt)]
    candidates = search_ids(conn, IndexKey(master_key), flt.text)
    if not candidates:
        return []
    found = []
    query_tokens = max(candidates.values())
    for row in conn.execute(stmt.where(records.c.id.in_(list(candidates)))):
        fields = _values(master_key, row)
        weight = 0.5 + 0.5 * candidates[row.id] / max(query_tokens, 1)
        found.append(
            _row(row, fields, round(name_similarity(flt.text, names_of(fields)) * weight, 1))
        )
    found.sort(key=lambda p: (-(p.score or 0), p.id))
    return found[flt.offset : flt.offset + flt.limit]


def get_person(
    conn: sa.Connection, record_id: str, *, sites: frozenset[str] | None, master_key: bytes
) -> PersonView:
    """One record and every value each field has had, oldest first (404 outside scope)."""
    row = conn.execute(sa.select(records).where(records.c.id == record_id)).first()
    if row is None or (sites is not None and row.site not in sites):
        raise Problem(404, "record.not_found", f"no record {record_id!r}")
    cipher = RecordCipher(master_key, row.id, row.wrapped_key)
    state = cipher.open(row.state, "state")
    history: list[FieldHistory] = []
    stmt = sa.select(changes).where(changes.c.record_id == record_id).order_by(changes.c.hub_seq)
    for change in conn.execute(stmt):
        body = cipher.open(change.sealed, "change")
        outcomes = json.loads(change.outcomes)
        for path, value in body["f"]:
            held = state.get(path, {})
            history.append(
                FieldHistory(
                    field=path,
                    value=value,
                    stamp=change.stamp,
                    device_id=change.device_id,
                    operator=change.operator,
                    received_at=as_utc(change.received_at) or datetime.now(UTC),
                    hub_seq=change.hub_seq,
                    outcome=outcomes.get(path, "applied"),
                    is_current=held.get("s") == change.stamp and held.get("d") == change.device_id,
                )
            )
    fields = {p: f["v"] for p, f in state.items()}
    return PersonView(_row(row, fields), fields, history)
