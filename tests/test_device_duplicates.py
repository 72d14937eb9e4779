"""Offline, on the device: a new registration is checked against local records."""

from __future__ import annotations

import json
from pathlib import Path

from field_client.store import Store
from schemas.record import RegistrationCreate
from tests.conftest import run_cli, sample_record


def test_possible_duplicates_across_spellings_and_scripts(store: Store) -> None:
    [earlier, _] = store.register(
        [
            RegistrationCreate.model_validate(sample_record()),
            RegistrationCreate.model_validate(
                sample_record(
                    names={"given": "Grace", "family": "Okafor"}, sex="female", documents=[]
                )
            ),
        ]
    )
    again = RegistrationCreate.model_validate(
        sample_record(
            names={"given": "Muhammad", "family": "Abdelrahman", "given_original": "محمد"},
            date_of_birth={"value": "1988-01-01", "precision": "year"},
        )
    )
    [found] = store.possible_duplicates(again)
    assert found.id == str(earlier.id) and found.site == "ras-jedir"
    assert "documents" in found.why and found.score >= 0.15
    stranger = RegistrationCreate.model_validate(
        sample_record(
            names={"given": "Kwame", "family": "Mensah"}, documents=[], nationalities=["GHA"]
        )
    )
    assert store.possible_duplicates(stranger) == []


def test_json_import_records_the_decision(tmp_path: Path) -> None:
    home = tmp_path / "device"
    assert run_cli(home, "init", "--site", "ras-jedir", "--operator", "Amina").returncode == 0
    assert (
        run_cli(home, "register", "--json", "-", input=json.dumps(sample_record())).returncode == 0
    )
    again = sample_record(names={"given": "Mohammed", "family": "Abd al-Rahman"})
    result = run_cli(home, "register", "--json", "-", "--check-duplicates", input=json.dumps(again))
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no serializer warning
    assert "1 possibly already registered" in result.stdout
    new_id = result.stdout.split("registered ")[-1].split()[0]
    shown = json.loads(run_cli(home, "show", new_id, "--json").stdout)
    assert shown["duplicate_review"]["decision"] == "registered_anyway"
    assert len(shown["duplicate_review"]["candidates"]) == 1


def test_the_same_person_twice_in_one_file_is_flagged(tmp_path: Path) -> None:
    home = tmp_path / "device"
    assert run_cli(home, "init", "--site", "ras-jedir", "--operator", "Amina").returncode == 0
    stranger = sample_record(
        names={"given": "Kwame", "family": "Mensah"}, documents=[], nationalities=["GHA"]
    )
    again = sample_record(names={"given": "Muhammad", "family": "Abdel Rahman"})
    twice = [sample_record(), stranger, again]
    result = run_cli(home, "register", "--json", "-", "--check-duplicates", input=json.dumps(twice))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "1 possibly already registered" in result.stdout
    listed = [json.loads(line) for line in run_cli(home, "list", "--json").stdout.splitlines()]
    shown = {
        row["name"].split(" (")[0]: json.loads(run_cli(home, "show", row["id"], "--json").stdout)
        for row in listed
    }
    first, later = shown["Mohamed Abdel Rahman"], shown["Muhammad Abdel Rahman"]
    assert first["duplicate_review"] is None and shown["Kwame Mensah"]["duplicate_review"] is None
    review = later["duplicate_review"]
    assert review["decision"] == "registered_anyway" and review["candidates"] == [first["id"]]
    assert review["best_score"] >= 0.15
    # Then the store holds both: a third time names the two of them.
    third = run_cli(
        home, "register", "--json", "-", "--check-duplicates", input=json.dumps(sample_record())
    )
    third_id = third.stdout.split("registered ")[-1].split()[0]
    review = json.loads(run_cli(home, "show", third_id, "--json").stdout)["duplicate_review"]
    assert sorted(review["candidates"]) == sorted([first["id"], later["id"]])
