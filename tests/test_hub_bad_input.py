"""Bad input to `fieldreg-hub` and the hub API: one clear line (or a problem),
exit code 2 (or 422), and nothing changed. Real subprocesses on a real hub
directory, as `tests/test_hub_cli.py` runs them."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.hub import Hub
from server.settings import HubSettings
from tests.hubkit import HandDevice, init_hub, live_hub
from tests.test_dedup_file import pairs_of, people
from tests.test_duplicates import add_operator, login, registration
from tests.test_hub_cli import hub
from tests.test_hub_people import World

ADMIN_ENV = {"FIELDREG_HUB_ADMIN_PASSWORD": "a long admin password"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised hub for the commands that must change nothing."""
    path = tmp_path_factory.mktemp("bad-input") / "hub"
    made = hub(path, "init", env=ADMIN_ENV)
    assert made.returncode == 0, made.stderr
    return path


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub]]:
    """A live hub on SQLite with operator `op` for sites border and camp."""
    with (
        live_hub(init_hub(tmp_path / "hub")) as (base, hub_),
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        add_operator(hub_, "op", ["border", "camp"])
        yield http, hub_


def _refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit code 2 and one line on stderr saying what is wrong."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _count(data: Path, table: str) -> int:
    with sqlite3.connect(data / "hub.db") as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.mark.parametrize(
    "expires", ["3000000d", "99999999999d", "91d", "2161h", "9" * 5000 + "m", "0m", "000h"]
)
def test_an_enrolment_code_valid_for_too_long_or_no_time_is_refused_with_the_range(
    data: Path, expires: str
) -> None:
    before = _count(data, "enrol_codes")
    result = hub(data, "enrol-code", "--site", "ras-jedir", "--expires", expires)
    _refused(result, "--expires", "up to 90d")
    assert _count(data, "enrol_codes") == before


def test_the_longest_and_shortest_enrolment_codes_are_made(data: Path) -> None:
    for expires in ("90d", "2160h", "1m", "007d"):
        made = hub(data, "enrol-code", "--site", "ras-jedir", "--expires", expires)
        assert made.returncode == 0, made.stderr
    assert hub(data, "enrol-code", "--site", "ras-jedir", "--expires", "0d").returncode == 2


def test_an_audit_export_to_a_missing_directory_or_a_directory_is_refused(
    data: Path, tmp_path: Path
) -> None:
    since = ("--since", "2026-11-01T00:00:00Z")
    missing = hub(data, "audit", "export", *since, "--out", str(tmp_path / "none" / "a.jsonl"))
    _refused(missing, "no directory")
    assert not (tmp_path / "none").exists()
    into_dir = hub(data, "audit", "export", *since, "--out", str(tmp_path))
    _refused(into_dir, "is a directory")
    empty = hub(data, "audit", "export", "--out", "")
    _refused(empty, "is a directory")
    assert list(tmp_path.iterdir()) == []
    done = hub(data, "audit", "export", "--out", str(tmp_path / "a.jsonl"))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
    assert f"exported {_count(data, 'audit_log')} entries" in done.stderr


def _people_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in people()), encoding="utf-8")
    return path


def test_dedup_file_refuses_to_write_over_its_input(tmp_path: Path) -> None:
    source = _people_file(tmp_path / "same.jsonl")
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    for out in ("same.jsonl", "./sub/../same.jsonl", str(source)):
        _refused(hub(tmp_path, "dedup-file", str(source), "-o", str(tmp_path / out)), "input")
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    _refused(hub(tmp_path, "dedup-file", str(link), "-o", str(source)), "is the input")
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "same.jsonl", "sub"]


def test_dedup_file_refuses_an_empty_or_directory_output(tmp_path: Path) -> None:
    source = _people_file(tmp_path / "people.jsonl")
    _refused(hub(tmp_path, "dedup-file", str(source), "-o", ""), "--out is empty")
    _refused(hub(tmp_path, "dedup-file", str(source), "-o", str(tmp_path)), "is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["people.jsonl"]


def test_dedup_file_reports_json_nested_too_deeply(tmp_path: Path) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    out = tmp_path / "pairs.csv"
    _refused(hub(tmp_path, "dedup-file", str(deep), "-o", str(out)), "nested too deeply")
    assert not out.exists()
    mixed = _people_file(tmp_path / "mixed.jsonl")
    with mixed.open("a", encoding="utf-8") as stream:
        stream.write('{"id": "deep", "notes": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    done = hub(tmp_path, "dedup-file", str(mixed), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "nested too deeply" in done.stderr and "Traceback" not in done.stderr
    assert pairs_of(out)


def test_dedup_file_reads_tab_separated_values(tmp_path: Path) -> None:
    rows = [
        ["id", "names.given", "names.family", "sex", "date_of_birth", "nationalities"],
        ["a", "Mohamed", "Abdel Rahman", "male", "1990-05-04", "EGY"],
        ["b", "Mohammed", "Abdelrahman", "male", "1990-05-04", "EGY"],
    ]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "pairs.csv"
    done = hub(tmp_path, "dedup-file", str(tsv), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert frozenset({"a", "b"}) in pairs_of(out)


@pytest.mark.parametrize("field", ["nope", "names.givn"])
def test_a_merge_taking_an_unknown_field_is_refused_and_merges_nothing(
    live: tuple[httpx.Client, Hub], field: str
) -> None:
    http, hub_ = live
    border, camp = HandDevice.enrol(http, hub_, "border"), HandDevice.enrol(http, hub_, "camp")
    first = registration(border, {"given": "Mohamed", "family": "Abdel Rahman"}, "1988-03-14", "A1")
    border.open_answer(border.push(border.envelope([first])))
    again = registration(camp, {"given": "Muhammad", "family": "Abdelrahman"}, "1988", "a 1")
    camp.open_answer(camp.push(camp.envelope([again])))
    auth = login(http)
    [pair] = http.get("/api/v1/duplicates", headers=auth).json()
    refused = http.post(
        f"/api/v1/duplicates/{pair['id']}/merge",
        headers=auth,
        json={"survivor": first.record_id, "take_from_other": ["names.given", field]},
    )
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "request.invalid" and repr(field) in refused.json()["detail"]
    assert http.get(f"/api/v1/duplicates/{pair['id']}", headers=auth).json()["status"] == "open"
    view = http.get(f"/api/v1/records/{first.record_id}", headers=auth).json()
    assert view["fields"]["names.given"] == "Mohamed"
    other = http.get(f"/api/v1/records/{again.record_id}", headers=auth).json()
    assert not other["fields"].get("merged_into")


@pytest.mark.parametrize("choice", ["current", "incoming"])
def test_a_value_with_a_choice_that_keeps_a_side_is_refused(
    live: tuple[httpx.Client, Hub], choice: str
) -> None:
    world = World(*live)
    [listed] = world.get("/api/v1/conflicts", "opa").json()
    for value in (["food", "shelter"], None):
        refused = world.post(
            f"/api/v1/conflicts/{listed['id']}/resolve",
            "aud",
            json={"choice": choice, "value": value, "reason": "both, said the person"},
        )
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "choice 'value' only" in refused.json()["detail"]
    assert [c["id"] for c in world.get("/api/v1/conflicts", "aud").json()] == [listed["id"]]
    done = world.post(
        f"/api/v1/conflicts/{listed['id']}/resolve",
        "aud",
        json={"choice": choice, "reason": "checked with the person"},
    )
    assert done.status_code == 200, done.text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("user", "add", "", "--role", "admin"), "cannot be empty"),
        (("user", "add", "   ", "--role", "admin"), "cannot be empty"),
        (("user", "add", "a\tb", "--role", "admin"), "control characters"),
        (("user", "add", "c1\u009bname", "--role", "admin"), "control characters"),  # a CSI
        (("user", "add", "x" * 129, "--role", "admin"), "at most 128"),
        (("user", "add", "sam", "--role", "hub_operator", "--site", "BAD!"), "not a site code"),
        (("enrol-code", "--site", "BAD!"), "not a site code"),
    ],
)
def test_user_names_and_site_codes_follow_one_rule(
    data: Path, args: tuple[str, ...], needle: str
) -> None:
    before = _count(data, "users")
    env = {"FIELDREG_HUB_USER_PASSWORD": "a long user password"}
    _refused(hub(data, *args, env=env), needle)
    assert _count(data, "users") == before


def test_init_refuses_an_admin_no_one_could_log_in_as(tmp_path: Path) -> None:
    _refused(hub(tmp_path / "hub", "init", "--admin", "", env=ADMIN_ENV), "--admin", "empty")
    assert not (tmp_path / "hub").exists() or list((tmp_path / "hub").iterdir()) == []


def test_migrate_names_a_missing_data_directory_or_one_without_a_hub(tmp_path: Path) -> None:
    _refused(hub(tmp_path / "none", "migrate"), "does not exist")
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    _refused(hub(tmp_path / "empty", "migrate"), "holds no hub", "fieldreg-hub init")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_hub_whose_database_went_missing_says_so_and_makes_none(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    assert hub(data, "init", env=ADMIN_ENV).returncode == 0
    (data / "hub.db").rename(data / "elsewhere.db")
    for args in (("device", "list"), ("records",), ("user", "list"), ("dedup", "list")):
        _refused(hub(data, *args), "hub.db is missing", "backup")
        assert not (data / "hub.db").exists()


def test_revoking_a_revoked_device_says_when_and_why_and_keeps_the_reason(
    tmp_path: Path,
) -> None:
    data = tmp_path / "hub"
    assert hub(data, "init", env=ADMIN_ENV).returncode == 0
    with live_hub(HubSettings(data_dir=data)) as (url, live), httpx.Client(base_url=url) as http:
        device = HandDevice.enrol(http, live, "ras-jedir")
    for bad in ("", "   ", "x" * 501, "lost\x1b[2J"):  # shown in `device list`, kept for audit
        _refused(hub(data, "device", "revoke", device.id, "--reason", bad), "reason of 1 to 500")
    with sqlite3.connect(data / "hub.db") as db:
        assert db.execute("SELECT revoked_at FROM devices").fetchone() == (None,)
    assert hub(data, "device", "revoke", device.id, "--reason", "phone lost").returncode == 0
    again = hub(data, "device", "revoke", device.id, "--reason", "found again")
    assert again.returncode == 0, again.stderr
    assert "already revoked" in again.stdout and "(phone lost)" in again.stdout
    with sqlite3.connect(data / "hub.db") as db:
        [reason] = db.execute("SELECT revoked_reason FROM devices").fetchone()
    assert reason == "phone lost"


_UNREADABLE_MASTER_KEY = """
import pathlib
import sys

read_bytes = pathlib.Path.read_bytes

def refuse(path):  # what a master.key of another user gives (root reads any file)
    if path.name == "master.key":
        raise PermissionError(13, "Permission denied", str(path))
    return read_bytes(path)

pathlib.Path.read_bytes = refuse
from server.cli import main
sys.argv = ["fieldreg-hub", *sys.argv[1:]]
main()
"""


def test_unreadable_or_damaged_key_files_are_named_in_one_line(data: Path, tmp_path: Path) -> None:
    unreadable = subprocess.run(
        [sys.executable, "-c", _UNREADABLE_MASTER_KEY, "device", "list", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _refused(unreadable, f"{data / 'master.key'}: Permission denied")
    directory = tmp_path / "directory"
    shutil.copytree(data, directory)
    (directory / "master.key").unlink()
    (directory / "master.key").mkdir()
    _refused(hub(directory, "device", "list"), f"{directory / 'master.key'}: Is a directory")
    truncated = tmp_path / "truncated"
    shutil.copytree(data, truncated)
    keys = truncated / "hub.keys"
    keys.write_bytes(keys.read_bytes()[:50])
    _refused(hub(truncated, "user", "list"), f"{keys} is damaged", "backup")


def test_init_under_a_regular_file_says_which_and_makes_nothing(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("notes\n", encoding="utf-8")
    _refused(hub(afile / "hub", "init"), f"({afile} is a file)", "nothing was kept")
    _refused(hub(afile, "init"), f"{afile} is a file, not a directory")
    assert afile.read_text(encoding="utf-8") == "notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("limit", ["0", "1000001", "99999999999999999999"])
def test_records_limit_is_bounded(data: Path, limit: str) -> None:
    refused = hub(data, "records", "--limit", limit)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and "--limit" in refused.stderr


def test_text_that_is_not_utf8_is_refused_in_one_line(data: Path, tmp_path: Path) -> None:
    """Bytes of another encoding reach Python as lone surrogates ("\\udcff"),
    which neither the database nor the password hash takes."""
    before = _count(data, "users")
    user_env = {"FIELDREG_HUB_USER_PASSWORD": "a long user password"}
    latin1 = "b\udcf6b"  # "böb" written in Latin-1
    _refused(hub(data, "user", "add", latin1, "--role", "auditor", env=user_env), "argument 3")
    _refused(hub(data, "user", "disable", latin1), "is not UTF-8 text")
    bad_password = {"FIELDREG_HUB_USER_PASSWORD": "a long p\udcf6ssword"}
    _refused(
        hub(data, "user", "add", "bob", "--role", "auditor", env=bad_password),
        "FIELDREG_HUB_USER_PASSWORD is not UTF-8 text",
    )
    assert _count(data, "users") == before
    bad_admin = {"FIELDREG_HUB_ADMIN_PASSWORD": "a long p\udcf6ssword"}
    _refused(hub(tmp_path / "hub", "init", env=bad_admin), "FIELDREG_HUB_ADMIN_PASSWORD is not")
    assert not (tmp_path / "hub").exists()


def test_an_empty_admin_password_variable_gets_a_password_made_and_shown(tmp_path: Path) -> None:
    made = hub(tmp_path / "hub", "init", env={"FIELDREG_HUB_ADMIN_PASSWORD": ""})
    assert made.returncode == 0, made.stderr
    assert "password (shown once): " in made.stdout
