"""`fieldreg-hub dedup-file`: duplicate pairs in a JSON Lines or CSV file, no hub needed.

Run through a small Typer app that calls `server.dedup_commands.register` (what
`server.cli` does) and, once `server.cli` registers it, as a real subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from bench.dedup_data import generate
from schemas.matching import OPERATING_THRESHOLD
from server import dedup_commands
from server.dedup_file import InputError, parse, unflatten

ROOT = Path(__file__).resolve().parent.parent

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _hub() -> None:
    """Stands in for `fieldreg-hub`."""


dedup_commands.register(app)


def run(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, ["dedup-file", *args], input=stdin)


def pairs_of(path: Path) -> dict[frozenset[str], float]:
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["id_1", "id_2", "score"]
    return {frozenset(row[:2]): float(row[2]) for row in rows[1:]}


def people() -> list[dict[str, Any]]:
    """Mohamed Abdel Rahman three times (two spellings, one in Arabic script), a
    different Mohamed Ali, a household, and records with nearly nothing in them."""
    phone = "+218 92 555 1234"
    return [
        {
            "id": "egy-1",
            "names": {"given": "Mohamed", "family": "Abdel Rahman"},
            "sex": "male",
            "date_of_birth": {"value": "1990-05-04", "precision": "exact"},
            "nationalities": ["EGY"],
            "documents": [{"type": "passport", "status": "held", "number": "A12345678"}],
        },
        {
            "id": "egy-2",
            "names": {"given": "Muhammad", "family": "Abdelrahman"},
            "date_of_birth": {"value": "1990-05-04"},
            "phone": "0912345678",
        },
        {
            "id": "egy-3",
            "names": {"given_original": "محمد", "family_original": "عبد الرحمن"},
            "documents": [{"type": "passport", "number": "a 1234 5678"}],
        },
        {
            "id": "other",
            "names": {"given": "Mohamed", "family": "Ali"},
            "sex": "male",
            "date_of_birth": {"value": "1971-01-01", "precision": "year"},
        },
        {
            "id": "head",
            "names": {"given": "Ahmed", "family": "Hassan"},
            "date_of_birth": {"value": "1975-03-02"},
            "phone": phone,
        },
        {
            "id": "child",
            "names": {"given": "Omar", "family": "Hassan"},
            "date_of_birth": {"value": "2005-07-02"},
            "phone": phone,
        },
        {"names": {"given": "Tesfaye"}},  # no id: named by its line number, 7
        {"documents": [{"number": "A-12345678"}]},  # nothing but a document number
    ]


def test_jsonl_pairs_with_bad_lines_reported(tmp_path: Path) -> None:
    lines = [json.dumps(p, ensure_ascii=False) for p in people()]
    lines.insert(3, "{not json")
    lines.insert(5, "[1, 2]")
    source = tmp_path / "people.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "pairs.csv"
    result = run(str(source), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "line 4: not valid JSON" in result.stderr
    assert "line 6: expected a JSON object, got list" in result.stderr
    assert "8 records, 2 skipped" in result.stderr
    found = pairs_of(out)
    # one person: every pair among these four, or enough of them to join all four
    same = {"egy-1", "egy-2", "egy-3", "line:10"}  # line 10 has no id
    assert set().union(*found) == same
    assert {frozenset(("egy-1", "egy-2")), frozenset(("egy-3", "line:10"))} <= set(found)
    assert all(value >= OPERATING_THRESHOLD for value in found.values())


def test_csv_with_dotted_columns(tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_text(
        "\ufeffid,names.given,names.family,sex,date_of_birth,nationalities,"
        "documents.0.type,documents.0.number,phone,notes\n"
        "1,Mohamed,Abdel Rahman,male,1990-05-04,EGY;SDN,passport,A12345678,,\n"
        "2,Muhammad,Abdelrahman,,1990,SDN,,,+218 91 234 5678,seen at Salloum\n"
        "3,محمد,عبد الرحمن,,,,passport,a1234-5678,,\n"
        "4,Ahmed,Hassan,male,1975-03-02,,,,0912345678,\n"
        "5,Omar,Hassan,male,2005-07-02,,,,0912345678,\n"
        "6,too,many,cells,,,,,,,,,\n",
        encoding="utf-8",
    )
    out = tmp_path / "pairs.csv"
    result = run(str(source), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "line 7: 13 cells, but the header has 10" in result.stderr
    found = pairs_of(out)
    assert frozenset(("1", "3")) in found  # the document number, however written
    assert frozenset(("4", "5")) not in found  # a father and his son
    assert all(value >= OPERATING_THRESHOLD for value in found.values())


def test_threshold_and_stdout(tmp_path: Path) -> None:
    source = tmp_path / "people.jsonl"
    source.write_text("\n".join(json.dumps(p) for p in people()), encoding="utf-8")
    strict = run(str(source), "--out", "-", "--threshold", "0.999")
    loose = run(str(source), "--out", "-", "--threshold", "0")
    assert strict.exit_code == loose.exit_code == 0
    assert strict.stdout.splitlines()[0] == "id_1,id_2,score"
    assert len(strict.stdout.splitlines()) < len(loose.stdout.splitlines())
    assert "head,child," in loose.stdout  # scored (they share a phone), just not a pair


def test_stdin_is_read_as_json(tmp_path: Path) -> None:
    out = tmp_path / "pairs.csv"
    text = "\n".join(json.dumps(p) for p in people()[:3])
    result = run("-", "--out", str(out), stdin=text)
    assert result.exit_code == 0, result.output
    assert set(pairs_of(out)) >= {frozenset(("egy-1", "egy-2")), frozenset(("egy-1", "egy-3"))}


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, (), "cannot read"),
        (b"", (), "no records: the input is empty"),
        (b"\xff\xfe\x00garbage", (), "is not UTF-8 text"),
        (b"{nope\n[1]\n", (), "no readable record"),
        (b'{"names": {"given": "A"}}\nnot json\n', ("--strict",), "--strict: nothing written"),
        (b'{"names": {"given": "A"}}\n', ("--threshold", "high"), "--threshold 'high'"),
        (b'{"names": {"given": "A"}}\n', ("--threshold", "1.5"), "from 0 to 1"),
        (b'{"names": {"given": "A"}}\n', ("--format", "xml"), "--format 'xml'"),
        (b"given,family\nA,B\n", ("--format", "csv"), "no known column"),
        (b'id,names.given\n1,"A\n', ("--format", "csv"), "not valid CSV"),
        (b'[{"names": ', (), "not valid JSON"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, content: bytes | None, args: tuple[str, ...], message: str
) -> None:
    source = tmp_path / "in.jsonl"
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "pairs.csv"
    result = run(str(source), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(people()[0]), encoding="utf-8")
    result = run(str(source), "--out", str(tmp_path / "missing-dir" / "pairs.csv"))
    assert result.exit_code == 2
    assert "error: cannot write" in result.stderr


def test_parse_and_unflatten() -> None:
    assert unflatten(
        {
            "names.given": " Awa ",
            "names.aliases": "Aoua; Hawa",
            "documents.1.number": "P1234567",
            "documents": "",
            "household.group_id": "g1",
            "sex": "",
        }
    ) == {
        "names": {"given": "Awa", "aliases": ["Aoua", "Hawa"]},
        "documents": [None, {"number": "P1234567"}],
        "household": {"group_id": "g1"},
    }
    with pytest.raises(ValueError, match="documents"):
        unflatten({"documents": "P1234567"})
    with pytest.raises(ValueError, match="clashes"):
        unflatten({"sex": "male", "sex.code": "m"})
    parsed = parse('[{"id": 1}, {"id": 1}, {"id": {"x": 1}}, {}]')
    assert [r.id for r in parsed.records] == ["1", "line:4"]
    assert [str(b) for b in parsed.bad] == [
        "line 2: id '1' already used on line 1",
        "line 3: id must be a string or a number",
    ]
    with pytest.raises(InputError, match="empty"):
        parse("  \n")
    # Two columns filling one field: refused whichever comes first.
    for header in (
        "id,names.given.x,names.given",
        "id,names.given,names.given.x",
        "id,date_of_birth,date_of_birth.value",
        "id,date_of_birth.value,date_of_birth",
    ):
        with pytest.raises(InputError, match="both fill"):
            parse(header + "\n1,a,b\n", fmt="csv")
    with pytest.raises(InputError, match="twice"):
        parse("id,names.given,names.given\n1,a,b\n", fmt="csv")


def test_a_large_file_is_matched_well(tmp_path: Path) -> None:
    data = generate(1_200, seed=21)
    source = tmp_path / "big.jsonl"
    source.write_text(
        "\n".join(json.dumps({**item.doc, "id": f"r{i}"}) for i, item in enumerate(data)),
        encoding="utf-8",
    )
    out = tmp_path / "pairs.csv"
    result = run(str(source), "--out", str(out))
    assert result.exit_code == 0, result.output
    person = {f"r{i}": item.true_person for i, item in enumerate(data)}
    found = pairs_of(out)
    right = sum(len({person[i] for i in pair}) == 1 for pair in found)
    assert len(found) > 500 and right / len(found) >= 0.95


def test_real_command_in_a_subprocess(tmp_path: Path) -> None:
    source = tmp_path / "people.jsonl"
    source.write_text(
        "\n".join(json.dumps(p, ensure_ascii=False) for p in people()), encoding="utf-8"
    )
    out = tmp_path / "pairs.csv"
    done = _dedup_file(str(source), "--out", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert frozenset(("egy-1", "egy-2")) in pairs_of(out)
    bad = _dedup_file(str(tmp_path / "nope"), "--out", str(out), cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: cannot read")
    assert "Traceback" not in bad.stderr


def _dedup_file(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`fieldreg-hub dedup-file ARGS` as an operator runs it, in `cwd`."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "server", "dedup-file", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )


def test_ids_and_paths_holding_rich_markup_are_shown_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "legacy[bold].csv").write_text(
        "id,names.given,names.family\nx[/b],Ahmed,Ali\nx[/b],Ahmad,Ali\n[i]y,Ahmad,Ali\n",
        encoding="utf-8",
    )
    done = _dedup_file("legacy[bold].csv", "--out", "pairs[old].csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped line 3: id 'x[/b]' already used on line 2" in done.stderr
    assert "written to pairs[old].csv" in done.stderr
    assert set(pairs_of(tmp_path / "pairs[old].csv")) == {frozenset(("x[/b]", "[i]y"))}
    missing = _dedup_file("[bold]gone.csv", "--out", "-", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: cannot read [bold]gone.csv"), missing.stderr


_AHMED = {"names": {"given": "Ahmed", "family": "Ali"}, "date_of_birth": "1987-05-04"}
_AHMAD = {"names": {"given": "Ahmad", "family": "Ali"}, "date_of_birth": "1987-05-04"}


def test_text_with_an_unpaired_surrogate_is_skipped_and_no_temporary_file_is_left(
    tmp_path: Path,
) -> None:
    lines = [
        json.dumps({**_AHMED, "id": "\ud800a"}),  # json writes it as the escape "\ud800a"
        json.dumps({**_AHMAD, "id": "b"}),
        json.dumps({**_AHMAD, "id": "c", "names": {"given": "x\udfff", "family": "Ali"}}),
        json.dumps({**_AHMED, "id": "d"}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = _dedup_file("in.jsonl", "--out", "pairs.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped line 1: id: text with an unpaired surrogate" in done.stderr
    assert "skipped line 3: names.given: text with an unpaired surrogate" in done.stderr
    assert set(pairs_of(tmp_path / "pairs.csv")) == {frozenset(("b", "d"))}
    strict = _dedup_file("in.jsonl", "--out", "strict.csv", "--strict", cwd=tmp_path)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "pairs.csv"]


def test_line_numbers_are_the_files_and_records_without_id_never_take_an_id(
    tmp_path: Path,
) -> None:
    """A byte-order mark and blank lines before the first record, a name holding
    U+2028 (JSON text may): the lines reported are the lines an editor shows.
    A record without an id is `line:N`, which no id of the file takes from it."""
    lines = [
        "",
        "",
        json.dumps(_AHMED),
        "{not json",
        json.dumps({**_AHMAD, "place_of_birth": "Sfax\u2028Tunisia"}, ensure_ascii=False),
        "{again not json",
        json.dumps({**_AHMAD, "id": "line:7"}),
        json.dumps({**_AHMED, "id": 3}),
    ]
    (tmp_path / "in.jsonl").write_text("\ufeff" + "\r\n".join(lines), encoding="utf-8")
    done = _dedup_file("in.jsonl", "--out", "-", "--threshold", "0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped line 4: not valid JSON" in done.stderr
    assert "skipped line 6: not valid JSON" in done.stderr
    assert "4 records, 2 skipped" in done.stderr
    names = {name for row in done.stdout.splitlines()[1:] for name in row.split(",")[:2]}
    assert names == {"line:3", "line:5", "line:7", "3"}
    (tmp_path / "in.csv").write_text(
        "id,names.given,names.family,date_of_birth\n"
        ",Ahmed,Ali,1987-05-04\n"
        ",Samir,Haddad,1990-01-01\n"
        "3,Ahmad,Ali,1987-05-04\n"
        "line:2,Ahmad,Ali,1987-05-04\n",
        encoding="utf-8",
    )
    done = _dedup_file("in.csv", "--out", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4 records, 0 skipped" in done.stderr
    names = {name for row in done.stdout.splitlines()[1:] for name in row.split(",")[:2]}
    assert names == {"line:2.2", "3", "line:2"}  # Samir pairs with no one


def test_a_csv_cell_longer_than_pythons_default_limit_is_read(tmp_path: Path) -> None:
    photo = "A" * 200_000  # a small photo as base64
    (tmp_path / "in.csv").write_text(
        "id,names.given,names.family,date_of_birth,photo\n"
        "1,Ahmed,Ali,1987-05-04,\n"
        f"2,Ahmad,Ali,1987-05-04,{photo}\n",
        encoding="utf-8",
    )
    done = _dedup_file("in.csv", "--out", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [row.split(",")[:2] for row in done.stdout.splitlines()[1:]] == [["1", "2"]]
