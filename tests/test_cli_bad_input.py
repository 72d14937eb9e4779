"""`fieldreg` given bad input: a one-line error, exit code 2, nothing written.

Found by an exploratory test of the device CLI; each test fails without its fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from field_client import hub_commands
from field_client.store import Store
from schemas.record import RegistrationCreate
from schemas.validation import InvalidRecord
from sync.protocol import Edit, group_changes
from sync.transport import HubProblem
from tests.conftest import PASSPHRASE, sample_record
from tests.conftest import run_cli as run

LONG = "x" * 201


def _registered(home: Path) -> str:
    result = run(home, "register", "--json", "-", input=json.dumps(sample_record()))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[1]


def _status(home: Path) -> str:
    result = run(home, "status")
    assert result.returncode == 0, result.stderr
    return result.stdout


def _refused(result: object, *words: str) -> None:
    returncode, stderr = result.returncode, result.stderr  # type: ignore[attr-defined]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 2, stderr
    for word in words:
        assert word in stderr, stderr


# -- 1, 2: an operator the hub would refuse never reaches the outbox -----------------------


@pytest.mark.parametrize("operator", [LONG, "   ", ""])
def test_edit_refuses_an_operator_the_hub_would_refuse(home: Path, operator: str) -> None:
    rid = _registered(home)
    before = _status(home)
    result = run(home, "edit", rid, "--set", "occupation=baker", "--operator", operator)
    _refused(result, "--operator", "1 to 200 characters")
    assert _status(home) == before
    assert json.loads(run(home, "show", rid, "--json").stdout)["occupation"] == "mason"


@pytest.mark.parametrize("operator", [LONG, "   "])
def test_register_refuses_an_operator_the_hub_would_refuse(
    home: Path, tmp_path: Path, operator: str
) -> None:
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(sample_record()))
    _refused(run(home, "register", "--json", str(ok), "--operator", operator), "--operator")
    assert "records    0" in _status(home)


def test_operator_is_kept_trimmed(home: Path) -> None:
    rid = _registered(home)
    padded = " " + "y" * 200 + " "  # 202 characters: the hub takes only 200
    result = run(home, "edit", rid, "--set", "occupation=baker", "--operator", padded)
    assert result.returncode == 0, result.stderr
    with Store.open(home, PASSPHRASE) as store:
        assert store.outbox(after_seq=0, limit=1000)[-1].operator == "y" * 200
        _valid_for_the_hub(store)


def _valid_for_the_hub(store: Store) -> None:
    for edit in group_changes(store.outbox(after_seq=0, limit=1000)):
        assert Edit.from_json(edit.to_json()) == edit


def test_store_refuses_or_trims_operators_for_the_hub(store: Store) -> None:
    item = RegistrationCreate.model_validate(sample_record())
    with pytest.raises(InvalidRecord, match="operator"):
        store.register([item], operator=LONG)
    with pytest.raises(InvalidRecord, match="operator"):
        store.register([item], operator="")
    # Trimmed to 200: the record's context always took it trimmed, the log did not.
    [saved] = store.register([item], operator="\t" + "z" * 200)
    rid = str(saved.id)
    seq = store.status().pending_outbox
    for bad in (LONG, " ", "a\udcff", "Am\u202eina", "Amina\x00"):
        with pytest.raises(InvalidRecord, match="operator"):
            store.edit(rid, {"occupation": "baker"}, operator=bad)
    assert store.status().pending_outbox == seq
    assert store.get(rid).occupation == "mason"
    _valid_for_the_hub(store)


# -- 3: one id twice in one input --------------------------------------------------------

SAME_ID = "01900000-0000-7000-8000-000000000001"


def test_register_refuses_one_id_given_twice_without_showing_the_records(home: Path) -> None:
    other = sample_record(id=SAME_ID, names={"given": "Grace", "family": "Okafor"})
    records = [sample_record(id=SAME_ID), sample_record(), other]
    result = run(home, "register", "--json", "-", input=json.dumps(records))
    assert result.returncode == 2, result.stderr
    assert "record 3: id: record 1 has the same id" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Grace" not in result.stderr and "Mohamed" not in result.stderr
    assert "records    0" in _status(home)


def test_store_refuses_one_id_given_twice(store: Store) -> None:
    item = RegistrationCreate.model_validate(sample_record(id=SAME_ID))
    with pytest.raises(InvalidRecord, match=f"id: given twice: {SAME_ID}"):
        store.register([item, item])
    assert store.status().records == 0
    assert store.status().pending_outbox == 0


# -- 4: list --limit ---------------------------------------------------------------------


def test_list_limit_is_bounded(home: Path) -> None:
    _registered(home)
    result = run(home, "list", "--limit", "99999999999999999999")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--limit" in result.stderr
    assert run(home, "list", "--json", "--limit", "1000000").stdout.count("\n") == 1


# -- 5: JSON nested too deeply for the parser ----------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (DEEP, "input: not valid JSON: nested too deeply"),
        ('{"notes": ' + DEEP + "}", "line 1: not valid JSON: nested too deeply"),
        (json.dumps(sample_record()) + "\n" + DEEP, "line 2: not valid JSON: nested too deeply"),
    ],
)
def test_register_refuses_json_nested_too_deeply(home: Path, text: str, where: str) -> None:
    deep = home.parent / "deep.json"
    deep.write_text(text)
    result = run(home, "register", "--json", str(deep))
    assert result.returncode == 2, result.stderr[-500:]
    assert where in result.stderr and "Traceback" not in result.stderr
    assert "records    0" in _status(home)


# -- 6: an empty array, records that are not objects -----------------------------------------


def test_register_refuses_an_empty_array_like_an_empty_file(home: Path) -> None:
    for text in ("", "[]", " [ ] \n"):
        result = run(home, "register", "--json", "-", input=text)
        assert result.returncode == 2, (text, result.stdout)
        assert "no records" in result.stderr


def test_register_names_json_kinds_of_records_that_are_not_objects(home: Path) -> None:
    text = json.dumps([sample_record(), 5, None, "x", [], True])
    result = run(home, "register", "--json", "-", input=text)
    assert result.returncode == 2
    for line in (
        "record 2: expected a JSON object, got a number",
        "record 3: expected a JSON object, got null",
        "record 4: expected a JSON object, got a string",
        "record 5: expected a JSON object, got an array",
        "record 6: expected a JSON object, got true",
    ):
        assert f"error: {line}\n" in result.stderr, result.stderr
    assert "records    0" in _status(home)


# -- a hub that fails is not a hub that refused ---------------------------------------------


def test_a_hub_failing_with_a_5xx_is_not_called_a_refusal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    failed = HubProblem(500, "hub.bad_answer", "HTTP 500 without a problem body")
    with pytest.raises(typer.Exit) as info:
        hub_commands._hub_failure(failed, "http://127.0.0.1:9", is_stored=True)
    said = capsys.readouterr().err
    assert info.value.exit_code == 2
    assert "the hub failed (HTTP 500" in said and "nothing lost, run again later" in said
    assert "refused" not in said
    refused = HubProblem(409, "batch.id_reused", "this batch id was already used")
    with pytest.raises(typer.Exit):
        hub_commands._hub_failure(refused, "http://127.0.0.1:9", is_stored=True)
    assert "the hub refused (batch.id_reused)" in capsys.readouterr().err


def test_a_hub_problem_is_printed_as_the_hub_said_it(capsys: pytest.CaptureFixture[str]) -> None:
    down = HubProblem(503, "hub.maintenance", "down [/maintenance] :construction:")
    with pytest.raises(typer.Exit):
        hub_commands._hub_failure(down, "http://127.0.0.1:9/[/b]", is_stored=True)
    said = capsys.readouterr().err
    assert "(HTTP 503, hub.maintenance): down [/maintenance] :construction:; nothing" in said


# -- a date of birth given as a number is not a Unix timestamp ------------------------------


@pytest.mark.parametrize("value", ["0", 0, 1990])
def test_a_date_of_birth_given_as_a_number_is_refused(home: Path, value: object) -> None:
    born = sample_record(date_of_birth={"value": value, "precision": "year"})
    result = run(home, "register", "--json", "-", input=json.dumps(born))
    _refused(result, "error: date_of_birth.value: input should be a valid date (YYYY-MM-DD)")
    assert "records    0" in _status(home)
    rid = _registered(home)
    edited = run(home, "edit", rid, "--set", f'date_of_birth={{"value": {json.dumps(value)}}}')
    _refused(edited, "date_of_birth.value: input should be a valid date (YYYY-MM-DD)")
    edited = run(home, "edit", rid, "--set", "date_of_birth=1990")  # a year, as typed
    assert edited.returncode == 0, edited.stderr
    shown = json.loads(run(home, "show", rid, "--json").stdout)
    assert shown["date_of_birth"] == {"value": "1990-01-01", "precision": "year"}
