"""Bad input to `fieldreg-hub` and the hub API: one clear line (or a problem),
exit code 2 (or 422), and nothing changed. Real subprocesses on a real hub
directory, as `tests/test_hub_cli.py` runs them."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.test_dedup_file import pairs_of, people
from tests.test_hub_cli import hub

ADMIN_ENV = {"FIELDREG_HUB_ADMIN_PASSWORD": "a long admin password"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised hub for the commands that must change nothing."""
    path = tmp_path_factory.mktemp("bad-input") / "hub"
    made = hub(path, "init", env=ADMIN_ENV)
    assert made.returncode == 0, made.stderr
    return path


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


@pytest.mark.parametrize("expires", ["3000000d", "99999999999d", "91d", "2161h", "9" * 5000 + "m"])
def test_an_enrolment_code_valid_for_too_long_is_refused_with_the_range(
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
    assert "exported 0 entries" in done.stderr


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
