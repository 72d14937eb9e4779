"""`/healthz`: is the process up and its database reachable."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter
from pydantic import BaseModel

from server.problems import Problem
from server.routes.deps import HubDep

__all__ = ["HealthPublic", "router"]

router = APIRouter()


class HealthPublic(BaseModel):
    status: str
    database: str
    epoch: str


@router.get("/healthz", response_model=HealthPublic)
def healthz(hub: HubDep) -> HealthPublic:
    try:
        with hub.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError:
        raise Problem(503, "database.unavailable", "the database does not answer") from None
    return HealthPublic(status="ok", database=hub.engine.dialect.name, epoch=hub.epoch)
