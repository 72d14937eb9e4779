"""A database lock held past the busy timeout (a long scan, a backup, another
process writing) gets a clear answer and changes nothing: 503
`database.unavailable` over HTTP, one line and exit code 1 at either CLI,
never a traceback. The same request passes once the lock is gone."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from field_client.store import Store
from server.settings import HubSettings
from tests.conftest import PASSPHRASE, run_cli
from tests.hubkit import HandDevice, database_backends, fresh_database, init_hub, live_hub

BUSY_TIMEOUT_S = 0.5


@pytest.fixture(params=database_backends())
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubSettings]:
    with fresh_database(request.param) as url:
        settings = init_hub(tmp_path / "hub", url)
        yield settings.model_copy(update={"busy_timeout_s": BUSY_TIMEOUT_S})


@contextmanager
def held_lock(settings: HubSettings) -> Iterator[None]:
    """Another process's transaction holding what the hub needs: SQLite's write
    lock; on PostgreSQL an exclusive lock on the devices table (as a migration
    or a restore would hold)."""
    if settings.database_url is None:
        conn = sqlite3.connect(settings.data_dir / "hub.db", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import psycopg

    with psycopg.connect(settings.database_url) as pg:
        pg.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            pg.rollback()


def test_a_push_meeting_a_held_lock_is_refused_with_503_and_applies_later(
    settings: HubSettings,
) -> None:
    with live_hub(settings) as (url, hub), httpx.Client(base_url=url) as http:
        device = HandDevice.enrol(http, hub, "dehiba")
        envelope = device.envelope([device.new_record("Amina")])
        with held_lock(settings):
            refused = device.push(envelope)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == "database.unavailable"
        assert refused.headers["retry-after"] == "10"
        # Nothing of it was stored: the same envelope now applies, once, as new.
        ack = device.open_answer(device.push(envelope))
        assert ack["duplicate"] is False and ack["high_water"] == device.seq
        again = device.open_answer(device.push(envelope))
        assert again["duplicate"] is True


def test_the_hub_cli_says_the_database_is_busy_in_one_line(settings: HubSettings) -> None:
    env = {
        **os.environ,
        "FIELDREG_HUB_DATA_DIR": str(settings.data_dir),
        "FIELDREG_HUB_BUSY_TIMEOUT_S": str(BUSY_TIMEOUT_S),
        "COLUMNS": "200",
    }
    env.pop("FIELDREG_HUB_DATABASE_URL", None)
    if settings.database_url:
        env["FIELDREG_HUB_DATABASE_URL"] = settings.database_url
    command = [sys.executable, "-m", "server", "device", "list"]
    with held_lock(settings):
        busy = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert busy.returncode == 1, busy.stderr
    assert "the database did not answer" in busy.stderr
    assert "Traceback" not in busy.stderr + busy.stdout
    after = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert after.returncode == 0, after.stderr


def test_fieldreg_says_the_store_is_busy_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "device"
    made = run_cli(home, "init", "--site", "ras-jedir", "--operator", "Amina")
    assert made.returncode == 0, made.stderr
    # Another fieldreg process in the middle of a write (the store's own
    # engine: its transactions begin IMMEDIATE, taking the write lock).
    with Store.open(home, PASSPHRASE) as holder, holder._engine.begin():
        busy = run_cli(home, "status")  # waits out the store's 10 s busy timeout
    assert busy.returncode == 1, busy.stderr
    assert "the store did not answer" in busy.stderr and "run the command again" in busy.stderr
    assert "Traceback" not in busy.stderr + busy.stdout
    assert run_cli(home, "status").returncode == 0
