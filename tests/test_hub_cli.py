"""`fieldreg-hub` as an operator runs it: real subprocesses on a real hub directory."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from server.settings import HubSettings
from tests.hubkit import POSTGRES_ENV, HandDevice, database_backends, fresh_database, live_hub


def hub(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`fieldreg-hub ARGS` on `data_dir`; with `code`, that Python program runs in
    its place (it calls `server.cli.main` after changing what the test needs)."""
    full_env = {**os.environ, "FIELDREG_HUB_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    full_env.pop("FIELDREG_HUB_DATABASE_URL", None)
    full_env.update(env or {})
    program = ["-c", code] if code is not None else ["-m", "server"]
    return subprocess.run(
        [sys.executable, *program, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def test_init_creates_private_keys_and_refuses_twice(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    first = hub(data, "init")
    assert first.returncode == 0, first.stderr
    assert "fingerprint" in first.stdout and "password (shown once)" in first.stdout
    for name in ("hub.keys", "master.key", "hub.db"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    second = hub(data, "init")
    assert second.returncode == 2 and "already holds a hub" in second.stderr
    assert hub(data, "migrate").returncode == 0


def test_enrol_code_device_list_and_revoke(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    assert (
        hub(data, "init", env={"FIELDREG_HUB_ADMIN_PASSWORD": "a long admin password"}).returncode
        == 0
    )
    bad = hub(data, "enrol-code", "--site", "Ras Jedir!")
    assert bad.returncode == 2 and "not a site code" in bad.stderr
    assert hub(data, "enrol-code", "--site", "ras-jedir", "--expires", "soon").returncode == 2
    made = hub(data, "enrol-code", "--site", "ras-jedir", "--expires", "30m")
    assert made.returncode == 0 and "enrolment code for site ras-jedir" in made.stdout
    with live_hub(HubSettings(data_dir=data)) as (url, live), httpx.Client(base_url=url) as http:
        device = HandDevice.enrol(http, live, "ras-jedir")
    listed = hub(data, "device", "list")
    assert device.id in listed.stdout and "active" in listed.stdout
    revoked = hub(data, "device", "revoke", device.id, "--reason", "phone lost")
    assert revoked.returncode == 0
    assert "revoked" in hub(data, "device", "list").stdout
    missing = hub(data, "device", "revoke", "no-such-device")
    assert missing.returncode == 2 and "no device" in missing.stderr
    again = hub(data, "device", "revoke", device.id)
    assert again.returncode == 0 and "already revoked" in again.stdout
    # Device administration is audited (the code itself is not), once each.
    with sqlite3.connect(data / "hub.db") as db:
        audited = db.execute(
            "SELECT actor, action, target FROM audit_log"
            " WHERE action IN ('device.enrol_code', 'device.revoke') ORDER BY id"
        ).fetchall()
    assert audited == [
        ("cli:admin", "device.enrol_code", "sites:ras-jedir"),  # `enrol-code` above
        ("cli:admin", "device.enrol_code", "sites:ras-jedir"),  # the one HandDevice used
        ("cli:admin", "device.revoke", f"device:{device.id}"),
    ]


def test_commands_before_init_explain_what_to_do(tmp_path: Path) -> None:
    result = hub(tmp_path / "empty", "device", "list")
    assert result.returncode == 2
    assert "fieldreg-hub init" in result.stderr and "Traceback" not in result.stderr


def test_user_commands(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    assert (
        hub(data, "init", env={"FIELDREG_HUB_ADMIN_PASSWORD": "a long admin password"}).returncode
        == 0
    )
    password = {"FIELDREG_HUB_USER_PASSWORD": "operator password long"}
    scoped = hub(data, "user", "add", "amina", "--role", "hub_operator", env=password)
    assert scoped.returncode == 2 and "at least one --site" in scoped.stderr
    weak = hub(
        data,
        "user",
        "add",
        "amina",
        "--role",
        "hub_operator",
        "--site",
        "s1",
        env={"FIELDREG_HUB_USER_PASSWORD": "short"},
    )
    assert weak.returncode == 2 and "at least 12 characters" in weak.stderr
    added = hub(
        data, "user", "add", "amina", "--role", "hub_operator", "--site", "s1", env=password
    )
    assert added.returncode == 0, added.stderr
    assert hub(data, "user", "add", "amina", "--role", "auditor", env=password).returncode == 2
    assert hub(data, "user", "add", "x", "--role", "janitor", env=password).returncode == 2
    listed = hub(data, "user", "list").stdout
    assert "amina" in listed and "hub_operator" in listed and "admin" in listed
    assert hub(data, "user", "disable", "amina").returncode == 0
    assert "disabled" in hub(data, "user", "list").stdout
    assert hub(data, "user", "enable", "amina").returncode == 0
    reset = hub(
        data,
        "user",
        "reset-password",
        "amina",
        env={"FIELDREG_HUB_USER_PASSWORD": "brand new password"},
    )
    assert reset.returncode == 0
    assert hub(data, "user", "disable", "nobody").returncode == 2
    assert "0 open pair(s)" in hub(data, "dedup", "list").stdout
    assert hub(data, "dedup", "list", "--status", "maybe").returncode == 2
    scanned = hub(data, "dedup", "scan", "--workers", "2")
    assert scanned.returncode == 0 and "checked 0 record(s)" in scanned.stdout
    assert hub(data, "dedup", "scan", "--workers", "0").returncode == 2
    verified = hub(data, "audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout


def test_init_against_another_hubs_database_makes_no_keys(tmp_path: Path) -> None:
    """A second hub pointed at a database that holds a hub already is refused
    before it writes keys that would not match that database."""
    shared = {"FIELDREG_HUB_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}"}
    first = hub(tmp_path / "a", "init", env=shared)
    assert first.returncode == 0, first.stderr
    second = hub(tmp_path / "b", "init", env=shared)
    assert second.returncode == 2 and "already holds a hub" in second.stderr
    assert not (tmp_path / "b").exists()
    third = hub(tmp_path / "a", "init", env=shared)
    assert third.returncode == 2 and "already holds a hub" in third.stderr


def _markup_hub(data: Path) -> str:
    """A hub whose records, conflict, duplicate pair and quarantined batch hold
    Rich markup; returns the id of its device."""
    settings = HubSettings(data_dir=data)
    with (
        live_hub(settings) as (url, live),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        a = HandDevice.enrol(http, live, "ras-jedir")
        b = HandDevice.enrol(http, live, "ras-jedir")
        same = {
            "date_of_birth": {"value": "1987-05-04", "precision": "day"},
            "sex": "male",
            "phone": "+21698765432",
            "place_of_birth": "[/i]Sfax",
        }
        one, two = a.new_record("Mahmoud[/b]"), a.new_record("Mahmoud[/b]")
        edits = [one, two, a.edit(one.record_id, same), a.edit(two.record_id, same)]
        first = a.new_record("Amal[/b]")
        edits += [first, a.new_record(":warning: [bold]mallory")]
        assert a.push(a.envelope(edits)).status_code == 200
        held = a.edit(first.record_id, {"names.family": "[/red]A"})
        assert a.push(a.envelope([held])).status_code == 200
        stale = {"names.family": first.version}
        late = b.edit(first.record_id, {"names.family": "[i]B"}, bases=stale)
        assert b.push(b.envelope([late])).status_code == 200
        orphan = b.edit(str(uuid.uuid4()), {"names.given": "x"})
        assert b.push(b.envelope([orphan], batch_id="evil[/b]")).status_code == 200
        return a.id


def _shown(result: subprocess.CompletedProcess[str], *texts: str) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for text in texts:
        assert text in result.stdout, result.stdout


def test_text_holding_rich_markup_is_shown_as_it_is(tmp_path: Path) -> None:
    """Names, reasons, ids and user names are data: `[/b]` in them is neither
    markup that crashes the command after it saved, nor dropped."""
    data = tmp_path / "hub"
    made = hub(data, "init", "--admin", "root[/b]")
    _shown(made, "admin 'root[/b]' password (shown once): ")
    password = made.stdout.split("(shown once): ")[1].split()[0]
    assert len(password) == 24  # token_urlsafe(18), whole
    device = _markup_hub(data)
    _shown(hub(data, "records"), "Amal[/b]", ":warning: [bold]mallory")
    _shown(hub(data, "conflicts"), "'[/red]A'", "'[i]B'")
    _shown(hub(data, "quarantine"), "batch evil[/b]:")
    _shown(hub(data, "dedup", "list"), "  Mahmoud[/b] Testperson  ", "'Mahmoud[/b] Testperson' ~")
    _shown(hub(data, "device", "revoke", device, "--reason", "lost [/b]"), f"device {device}")
    _shown(hub(data, "device", "revoke", device), "(lost [/b])")
    _shown(hub(data, "device", "list"), "revoked (lost [/b])")
    added = hub(
        data,
        "user",
        "add",
        "eve[/b]",
        "--role",
        "auditor",
        env={"FIELDREG_HUB_USER_PASSWORD": "a long user password"},
    )
    _shown(added, "user eve[/b] added as auditor")
    _shown(hub(data, "user", "list"), "eve[/b]", "root[/b]")
    _shown(hub(data, "user", "disable", "eve[/b]"), "user eve[/b] disabled")
    refused = hub(data, "user", "disable", "[bold]nobody")
    assert refused.returncode == 2 and "[bold]nobody" in refused.stderr, refused.stderr


def test_an_init_the_database_refuses_keeps_nothing_and_can_run_again(tmp_path: Path) -> None:
    """The database is someone else's (a table named like one of the hub's):
    the migration fails, and init takes away its keys and the directory it made."""
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (login TEXT)")
    shared = {"FIELDREG_HUB_DATABASE_URL": f"sqlite:///{other}"}
    data = tmp_path / "new" / "hub"
    for _ in range(2):  # not "already holds a hub" the second time
        failed = hub(data, "init", env=shared)
        assert failed.returncode == 2, failed.stderr
        assert "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert "users already exists" in failed.stderr and "nothing was kept" in failed.stderr
        assert not (tmp_path / "new").exists()
    with sqlite3.connect(other) as db:  # not ours: kept as it was
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables == [("users",)]
        db.execute("DROP TABLE users")
    done = hub(data, "init", env=shared)
    assert done.returncode == 0, done.stderr
    assert hub(data, "device", "list", env=shared).returncode == 0


_REFUSING_MIGRATION = """
import sys
import sqlalchemy as sa
import server.admin

def refuse(engine):
    with engine.connect():  # the SQLite file is made by then
        pass
    raise sa.exc.ProgrammingError(
        "CREATE TABLE users (name)", {"name": "secret-param"},
        Exception("permission denied for schema public\\nLINE 1: CREATE TABLE users"),
    )

server.admin.migrate = refuse
from server.cli import main
sys.argv = ["fieldreg-hub", *sys.argv[1:]]
main()
"""


_REFUSED_READ = """
import sys
import sqlalchemy as sa
import server.admin

def refuse(*args, **kwargs):
    raise sa.exc.IntegrityError(
        "SELECT * FROM records WHERE name = ?", ("secret-param",),
        Exception("permission denied for table records\\nDETAIL: secret-detail"),
    )

server.admin.list_records = refuse
from server.cli import main
sys.argv = ["fieldreg-hub", *sys.argv[1:]]
main()
"""


def test_any_database_error_is_one_line_without_the_statement(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    assert hub(data, "init").returncode == 0
    failed = hub(data, "records", code=_REFUSED_READ)
    assert failed.returncode == 1
    assert failed.stderr.strip() == (
        "error: the database refused (permission denied for table records);"
        " the step that failed changed nothing"
    )


def test_an_init_failing_after_its_keys_removes_its_keys_database_and_directory(
    tmp_path: Path,
) -> None:
    data = tmp_path / "hub"

    def refused_init() -> None:
        failed = hub(data, "init", code=_REFUSING_MIGRATION)
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr.strip() == (
            "error: init: the database refused (permission denied for schema public);"
            " nothing was kept"
        )

    for _ in range(2):  # not "already holds a hub" the second time
        refused_init()
        assert not data.exists()
    (data / "kept").mkdir(parents=True)  # a directory that was there stays, with its files
    refused_init()
    assert sorted(p.name for p in data.iterdir()) == ["kept"]


# PostgreSQL only: without FIELDREG_TEST_POSTGRES_URL no parameter, so not collected.
@pytest.mark.parametrize("backend", [b for b in database_backends() if b == "postgresql"])
def test_init_as_a_postgresql_role_without_create_keeps_nothing(
    tmp_path: Path, backend: str
) -> None:
    import psycopg

    admin_url = os.environ[POSTGRES_ENV]
    role = f"fieldreg_limited_{uuid.uuid4().hex[:8]}"
    data = tmp_path / "hub"
    try:
        with fresh_database(backend) as url:
            assert url is not None
            with psycopg.connect(url) as db:
                db.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                db.execute(f'CREATE ROLE "{role}" LOGIN')
                db.commit()
            limited = sa.make_url(url).set(username=role).render_as_string(hide_password=False)
            env = {"FIELDREG_HUB_DATABASE_URL": limited}
            for _ in range(2):  # the same answer again, not "already holds a hub"
                failed = hub(data, "init", env=env)
                assert failed.returncode == 2, failed.stderr
                assert failed.stderr.strip() == (
                    "error: init: the database refused (permission denied for schema public);"
                    " nothing was kept"
                )
                assert not data.exists()
            with psycopg.connect(url) as db:
                db.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
                db.commit()
            done = hub(data, "init", env=env)
            assert done.returncode == 0, done.stderr
    finally:
        with psycopg.connect(admin_url, autocommit=True) as db:
            db.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_ids_in_tables_are_whole_at_any_terminal_width(tmp_path: Path) -> None:
    """`device revoke ID` and `user disable NAME` take what the tables show:
    an id cut to `aaa2a8c9-9…` cannot be copied back."""
    data = tmp_path / "hub"
    assert hub(data, "init").returncode == 0
    site = "ras-jedir-north-camp-section-b"
    with (
        live_hub(HubSettings(data_dir=data)) as (url, live),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        device = HandDevice.enrol(http, live, site)
        record = device.new_record("Mohammed Abdulrahman Abdelaziz")
        assert device.push(device.envelope([record])).status_code == 200
    user = "amina.abdelrahman@unhcr-field-office.example"
    password = {"FIELDREG_HUB_USER_PASSWORD": "a long user password"}
    assert hub(data, "user", "add", user, "--role", "auditor", env=password).returncode == 0
    for columns in ("80", "60"):
        narrow = {"COLUMNS": columns}
        _shown(hub(data, "device", "list", env=narrow), device.id)
        _shown(hub(data, "records", env=narrow), record.record_id)
        _shown(hub(data, "user", "list", env=narrow), user)
