"""The Alembic migrations build exactly the tables the models describe, on
SQLite and PostgreSQL: a model changed without its migration fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import server.models  # noqa: F401  (registers the tables)
from server.db import make_engine, migrate
from tests.hubkit import database_backends, fresh_database


@pytest.mark.parametrize("backend", database_backends())
def test_migrating_to_head_gives_the_models_tables(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend) as url:
        engine = make_engine(url or f"sqlite:///{tmp_path / 'hub.db'}")
        try:
            migrate(engine)
            with engine.connect() as conn:
                differences = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        finally:
            engine.dispose()
    assert differences == []
