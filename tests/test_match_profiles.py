"""Stored match profiles (`match_profiles`, migration 0006): a hub upgraded from
0005 loses the profiles it kept in `records` and makes them again, and a
check finds the same pairs from stored profiles as from unsealed records."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from bench.dedup_data import generate
from bench.dedup_hub import check_one, populate
from server import db, dedup_check, match_profiles
from server.hub import Hub
from tests.hubkit import database_backends, fresh_database, init_hub


def _alembic(conn: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _pairs(hub: Hub) -> dict[tuple[str, str], float]:
    with hub.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT record_a, record_b, score FROM duplicates")).all()
    return {(a, b): round(s, 4) for a, b, s in rows}


def _check_all(hub: Hub, ids: list[str]) -> None:
    for rid in ids:  # one by one, as pushes arrive: candidates come from the store
        check_one(hub, rid, match_profiles.ProfileCache(0))


@pytest.mark.parametrize("backend", database_backends())
def test_a_hub_upgraded_from_0005_makes_its_profiles_again_and_finds_the_same_pairs(
    backend: str, tmp_path: Path
) -> None:
    docs = [
        (str(uuid.UUID(int=i + 1)), item.doc, item.site)
        for i, item in enumerate(generate(120, seed=5))
    ]
    with fresh_database(backend) as url:
        hub = Hub(init_hub(tmp_path / "hub", url))
        try:
            populate(hub, docs)  # stores every record's profile
            with hub.engine.begin() as conn:
                ids = dedup_check.all_record_ids(conn)
                assert match_profiles.unprofiled_ids(conn) == []
            _check_all(hub, ids)
            from_store = _pairs(hub)
            assert len(from_store) >= 5  # enough duplicates for the test to mean something

            # The same hub as it was at 0005: profiles beside the records.
            with hub.engine.begin() as conn:
                command.downgrade(_alembic(conn), "0005")
            with hub.engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM duplicates"))
                conn.execute(sa.text("UPDATE records SET match_profile = state, profile_seq = 0"))
            with hub.engine.begin() as conn:
                command.upgrade(_alembic(conn), "head")
            with hub.engine.begin() as conn:
                assert match_profiles.unprofiled_ids(conn) == ids
                columns = {c["name"] for c in sa.inspect(conn).get_columns("records")}
                assert not columns & {"match_profile", "profile_seq"}
            _check_all(hub, ids)  # each record is profiled again when first met
            assert _pairs(hub) == from_store
            with hub.engine.begin() as conn:
                assert match_profiles.unprofiled_ids(conn) == []
        finally:
            hub.engine.dispose()


@pytest.mark.parametrize("backend", database_backends())
def test_a_changed_record_needs_a_new_profile_and_store_profiles_makes_it(
    backend: str, tmp_path: Path
) -> None:
    docs = [
        (str(uuid.UUID(int=i + 1)), item.doc, item.site)
        for i, item in enumerate(generate(10, seed=5))
    ]
    with fresh_database(backend) as url:
        hub = Hub(init_hub(tmp_path / "hub", url))
        try:
            populate(hub, docs)
            changed = docs[3][0]
            with hub.engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE records SET last_hub_seq = 7 WHERE id = :r"), {"r": changed}
                )
                assert match_profiles.unprofiled_ids(conn) == [changed]
                made = match_profiles.store_profiles(
                    conn, [changed], master_key=hub.secrets.master_key
                )
                assert made == 1
                assert match_profiles.unprofiled_ids(conn) == []
        finally:
            hub.engine.dispose()
