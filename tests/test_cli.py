"""`fieldreg` as a person runs it: real subprocesses on a real SQLCipher store."""

from __future__ import annotations

import json
from pathlib import Path

from field_client.store import Store
from tests.conftest import PASSPHRASE, sample_record
from tests.conftest import run_cli as run


def test_init_refuses_weak_passphrase(tmp_path: Path) -> None:
    result = run(
        tmp_path / "d", "init", "--site", "s", "--operator", "o", env={"FIELDREG_PASSPHRASE": "abc"}
    )
    assert result.returncode == 2
    assert "passphrase too short" in result.stderr
    assert not (tmp_path / "d" / "store.db").exists()


def test_register_json_forms_and_list(home: Path, tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(sample_record()))
    many = tmp_path / "many.json"
    many.write_text(
        json.dumps([sample_record(), sample_record(names={"given": "Grace", "family": "Okafor"})])
    )
    lines = "\n".join(json.dumps(sample_record(names={"given": f"Person{i}"})) for i in range(3))
    assert run(home, "register", "--json", str(one)).returncode == 0
    assert "registered 2 people" in run(home, "register", "--json", str(many)).stdout
    result = run(home, "register", "--json", "-", input=lines)
    assert result.returncode == 0, result.stderr
    listed = run(home, "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 6
    assert run(home, "list", "--json", "--need", "evacuation").stdout.count("\n") == 6
    assert run(home, "list", "--json", "--scenario", "trapped").stdout.strip() == ""
    status = run(home, "status").stdout
    assert "records    6" in status and "not yet sent" in status


def test_register_reports_every_bad_field_and_writes_nothing(home: Path) -> None:
    bad = sample_record(
        date_of_birth={"value": "2999-01-01"},
        nationalities=["EGY", "XXX"],
    )
    good = sample_record()
    result = run(home, "register", "--json", "-", input=json.dumps([good, bad]))
    assert result.returncode == 2
    assert "record 2: date_of_birth: in the future" in result.stderr
    assert "record 2: nationalities[1]: 'XXX' is not an ISO 3166-1 alpha-3 code" in result.stderr
    assert "Traceback" not in result.stderr
    assert run(home, "list", "--json").stdout.strip() == ""


def test_register_refuses_broken_json(home: Path) -> None:
    result = run(home, "register", "--json", "-", input='{"names": ')
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr


def test_show_edit_search(home: Path) -> None:
    result = run(home, "register", "--json", "-", input=json.dumps(sample_record()))
    rid = result.stdout.split()[1]
    edited = run(
        home,
        "edit",
        rid[:13],
        "--set",
        "situation.needs=food,shelter",
        "--set",
        "date_of_birth=~1987",
    )
    assert edited.returncode == 0, edited.stderr
    shown = run(home, "show", rid, "--json")
    record = json.loads(shown.stdout)
    assert record["situation"]["needs"] == ["food", "shelter"]
    assert record["date_of_birth"] == {"value": "1987-01-01", "precision": "estimated"}
    history = run(home, "show", rid).stdout
    assert "situation.needs" in history and "current" in history
    assert rid in run(home, "search", "Muhammad").stdout
    bad = run(home, "edit", rid, "--set", "nationalities=XXX")
    assert bad.returncode == 2 and "nationalities[0]: 'XXX' is not" in bad.stderr
    assert run(home, "edit", rid, "--set", "nonsense").returncode == 2
    missing = run(home, "show", "01234567-0000")
    assert missing.returncode == 2 and "no record" in missing.stderr


def test_wrong_passphrase_is_a_clear_error(home: Path) -> None:
    result = run(home, "status", env={"FIELDREG_PASSPHRASE": "this is not the passphrase"})
    assert result.returncode == 2
    assert "wrong passphrase" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_store_is_a_clear_error(tmp_path: Path) -> None:
    result = run(tmp_path / "nothing", "status")
    assert result.returncode == 2
    assert "fieldreg init" in result.stderr


def test_passphrase_change(home: Path) -> None:
    run(home, "register", "--json", "-", input=json.dumps(sample_record()))
    new = "four quite random words"
    result = run(home, "passphrase", env={"FIELDREG_NEW_PASSPHRASE": new})
    assert result.returncode == 0, result.stderr
    assert run(home, "status").returncode == 2
    assert "records    1" in run(home, "status", env={"FIELDREG_PASSPHRASE": new}).stdout


def test_passphrase_change_while_a_sync_has_the_store_open(home: Path) -> None:
    run(home, "register", "--json", "-", input=json.dumps(sample_record()))
    new = "four quite random words"
    with Store.open(home, PASSPHRASE) as watching:  # as `fieldreg sync --watch` does
        watching.status()
        result = run(home, "passphrase", env={"FIELDREG_NEW_PASSPHRASE": new})
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "close other fieldreg commands and try again" in result.stderr
    assert sorted(p.name for p in home.iterdir()) == ["store.db", "store.key"]
    assert "records    1" in run(home, "status").stdout
    assert run(home, "status", env={"FIELDREG_PASSPHRASE": new}).returncode == 2


def test_schema_is_json_schema() -> None:
    result = run(Path("/nonexistent"), "schema")
    schema = json.loads(result.stdout)
    assert schema["title"] == "Registration"
    assert "names" in schema["properties"]
    assert "Scenario" in schema["$defs"]


# Rich markup and emoji codes that a person may type or a store may hold.
MARKUP_NAMES = {"given": "Ali [/b]", "family": "[unknown] Musa :sparkles:"}
MARKUP_NAME = "Ali [/b] [unknown] Musa :sparkles:"


def test_names_are_printed_as_typed_never_as_markup(home: Path) -> None:
    record = sample_record(names=MARKUP_NAMES, notes="[bold]see [/b] :warning:")
    result = run(home, "register", "--json", "-", input=json.dumps(record))
    assert result.returncode == 0, result.stderr
    assert f"({MARKUP_NAME})" in result.stdout and result.stderr == ""
    rid = result.stdout.split()[1]
    for args in (("list",), ("search", "Musa"), ("show", rid)):
        shown = run(home, *args)
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        assert MARKUP_NAME in shown.stdout, shown.stdout
    assert '"[bold]see [/b] :warning:"' in run(home, "show", rid).stdout


def test_error_lines_print_what_was_given_as_it_is(home: Path, tmp_path: Path) -> None:
    for args, line in (
        (("list", "--from", "[/b]"), "error: --from: '[/b]' is not a date (YYYY-MM-DD)"),
        (("show", "[/b]:sparkles:"), "error: no record '[/b]:sparkles:' in this store"),
        (("edit", "[/b]", "--set", "[red]"), "error: --set '[red]': expected field=value"),
    ):
        result = run(home, *args)
        assert result.returncode == 2 and result.stderr == line + "\n", result.stderr
    bad = sample_record(nationalities=["[/b]"])
    result = run(home, "register", "--json", "-", input=json.dumps(bad))
    assert result.returncode == 2
    assert "error: nationalities[0]: '[/b]' is not an ISO 3166-1 alpha-3 code\n" in result.stderr
    made = run(tmp_path / "x[/b]", "init", "--site", "[/x]", "--operator", "A")
    assert made.returncode == 2 and made.stderr.startswith("error: site: '[/x]' is not a site")
    made = run(tmp_path / "p[/b]", "init", "--site", "s1", "--operator", "A")
    assert made.returncode == 0 and f"Store created in {tmp_path / 'p[/b]'} for" in made.stdout


def test_input_starting_with_a_byte_order_mark_is_read(home: Path, tmp_path: Path) -> None:
    """Windows Notepad starts a UTF-8 file with a byte-order mark."""
    one, two = sample_record(), sample_record(names={"given": "Grace", "family": "Okafor"})
    texts = {
        "one.json": json.dumps(one),
        "array.json": json.dumps([one, two]),
        "lines.jsonl": f"{json.dumps(one)}\r\n{json.dumps(two)}\r\n",
    }
    for name, text in texts.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        result = run(home, "register", "--json", str(tmp_path / name))
        assert result.returncode == 0 and result.stderr == "", result.stderr
    result = run(home, "register", "--json", "-", input="\ufeff" + json.dumps(one))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "records    6" in run(home, "status").stdout
