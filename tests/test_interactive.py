"""`fieldreg register` in a terminal: the form asked field by field, through a real pty."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from field_client.forms import prompt_record
from schemas.record import RegistrationCreate
from schemas.validation import validate
from tests.conftest import PASSPHRASE, run_cli

ANSWERS = {
    "Given name (Latin letters)": "Amina",
    "Family name (Latin letters)": "Haroun",
    "Given name (original script)": "أمينة",
    "Sex": "female",
    "Nationalities": "tcd",
    "Languages": "ar,fr",
    "Scenario": "trapped",
    "Needs": "evacuation, food",
    "Date of birth": "~1990",
    "Consent given?": "yes",
    "Register anyway (r), link to one of them": "1",
}


def scripted(question: str, default: str) -> str:
    return next((a for q, a in ANSWERS.items() if question.startswith(q)), default)


def test_the_form_builds_a_valid_registration() -> None:
    record = validate(RegistrationCreate, prompt_record(scripted, operator="Yusuf"))
    assert record.names.given == "Amina" and record.names.given_original == "أمينة"
    assert record.nationalities == ["TCD"]
    assert [n.value for n in record.situation.needs] == ["evacuation", "food"]
    assert record.date_of_birth is not None and record.date_of_birth.precision.value == "estimated"
    assert record.consent.recorded_by == "Yusuf"


class Answers:
    """Scripted answers: a question takes its queued answers in turn, then `ANSWERS`."""

    def __init__(self, queued: dict[str, list[str]] | None = None) -> None:
        self.queued = {q: list(a) for q, a in (queued or {}).items()}
        self.asked: list[str] = []
        self.said: list[str] = []

    def ask(self, question: str, default: str) -> str:
        self.asked.append(question)
        for start, answers in self.queued.items():
            if question.startswith(start) and answers:
                return answers.pop(0)
        return scripted(question, default)

    def say(self, message: str) -> None:
        self.said.append(message)


def _record(answers: Answers) -> RegistrationCreate:
    return validate(
        RegistrationCreate, prompt_record(answers.ask, operator="Yusuf", say=answers.say)
    )


def test_a_wrong_date_of_birth_is_asked_again_and_nothing_typed_is_lost() -> None:
    answers = Answers({"Date of birth": ["1987-02-30", "14.03.1988", "1987-02-28"]})
    record = _record(answers)
    assert record.date_of_birth is not None
    assert str(record.date_of_birth.value) == "1987-02-28"
    assert record.date_of_birth.precision.value == "exact"
    assert record.names.given == "Amina" and record.names.family == "Haroun"
    assert record.nationalities == ["TCD"] and record.languages == ["ar", "fr"]
    assert [n.value for n in record.situation.needs] == ["evacuation", "food"]
    assert record.consent.given and record.consent.recorded_by == "Yusuf"
    assert len(answers.said) == 2
    assert all(m.startswith("Date of birth not accepted: ") for m in answers.said)
    assert "day value is outside expected range" in answers.said[0]
    assert all("Expected: type YYYY-MM-DD, YYYY, or ~YYYY" in m for m in answers.said)


def test_wrong_vocabulary_answers_are_asked_again() -> None:
    answers = Answers(
        {
            "Sex": ["femme", "Female"],
            "Nationalities": ["tcd,xyz", "tcd,egy"],
            "Languages": ["arabic", "ar"],
            "Needs": ["food, watr", "food, shelter"],
            "Consent given": ["maybe", "no"],
            "Legal basis": ["consent", "vital_interest"],
            "Consent scope": ["registration", ""],
        }
    )
    record = _record(answers)
    assert record.sex.value == "female" and record.nationalities == ["TCD", "EGY"]
    assert record.languages == ["ar"]
    assert [n.value for n in record.situation.needs] == ["food", "shelter"]
    assert not record.consent.given and record.consent.legal_basis.value == "vital_interest"
    assert record.consent.scope == []
    assert [m.split(" not accepted")[0] for m in answers.said] == [
        "Sex",
        "Nationalities",
        "Languages",
        "Needs",
        "Consent given?",
        "Legal basis",
        "Consent scope",
    ]
    assert "'femme'" in answers.said[0] and "'female'" in answers.said[0]
    assert "'XYZ': 'XYZ' is not an ISO 3166-1 alpha-3 code" in answers.said[1]
    # twelve needs: the question lists them, the complaint does not again
    assert "'watr': not one of the listed values" in answers.said[3]
    assert "consular_assistance" not in answers.said[3]
    assert "legal basis 'consent' requires consent to be given" in answers.said[5]
    assert "a scope was recorded but consent was not given" in answers.said[6]
    assert sum(q.startswith("Given name (Latin") for q in answers.asked) == 1


def test_empty_optional_answers_are_accepted_without_complaint() -> None:
    answers = Answers(
        {"Date of birth": [""], "Intention": [""], "Phone": [""], "Nationalities": [""]}
    )
    record = _record(answers)
    assert record.date_of_birth is None and record.situation.intention is None
    assert record.phone is None and record.nationalities == []
    assert answers.said == []


def test_a_form_without_any_name_asks_for_the_names_again() -> None:
    answers = Answers(
        {
            "Given name (Latin letters)": ["", "Amina"],
            "Family name (Latin letters)": ["", ""],
            "Given name (original script)": ["", ""],
        }
    )
    record = _record(answers)
    assert record.names.given == "Amina" and record.names.given_original is None
    assert answers.said == [
        "Names not accepted: at least one given or family name is required. Expected: a name"
    ]


def test_a_wrong_phone_is_asked_again() -> None:
    answers = Answers({"Phone": ["call me", "+235 66 12 34 56"]})
    record = _record(answers)
    assert record.phone == "+235 66 12 34 56"
    assert answers.said[0].startswith("Phone not accepted: 'call me': not in the expected form")
    assert "Expected: 4 to 24 digits" in answers.said[0] and "[0-9" not in answers.said[0]


def _register_in_terminal(home: Path, answers: Answers | None = None) -> tuple[int, str, int]:
    env = {
        **os.environ,
        "FIELDREG_HOME": str(home),
        "FIELDREG_PASSPHRASE": PASSPHRASE,
        "COLUMNS": "200",
    }
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "field_client", "register"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 60
    answered = 0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            screen += chunk
            if chunk.rstrip().endswith((b":", b")")):
                question = screen.decode(errors="replace").splitlines()[-1]
                answer = answers.ask if answers else scripted
                os.write(leader, (answer(question.strip(), "") + "\n").encode())
                answered += 1
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return proc.returncode, screen.decode(errors="replace"), answered


def test_register_in_a_real_terminal(tmp_path: Path) -> None:
    home = tmp_path / "device"
    assert run_cli(home, "init", "--site", "camp-1", "--operator", "Yusuf").returncode == 0
    code, text, answered = _register_in_terminal(home)
    assert code == 0, text
    assert "registered" in text and answered >= 10
    listed = run_cli(home, "search", "Amina")
    assert "Amina Haroun" in listed.stdout
    # The same person again: the form shows the earlier registration; linking is recorded.
    code, text, _ = _register_in_terminal(home)
    assert code == 0, text
    assert "Possibly already registered" in text
    new_id = re.findall(r"registered\W+([0-9a-f-]{36})", re.sub(r"\x1b\[[0-9;]*m", "", text))[-1]
    shown = json.loads(run_cli(home, "show", new_id, "--json").stdout)
    assert shown["duplicate_review"]["decision"] == "linked"
    assert shown["duplicate_review"]["linked_to"] == shown["duplicate_review"]["candidates"][0]


def test_a_wrong_date_in_a_real_terminal_is_asked_again(tmp_path: Path) -> None:
    home = tmp_path / "device"
    assert run_cli(home, "init", "--site", "camp-1", "--operator", "Yusuf").returncode == 0
    code, text, _ = _register_in_terminal(
        home, Answers({"Date of birth": ["14.03.1988", "1988-03-14"]})
    )
    assert code == 0, text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "Date of birth not accepted: '14.03.1988': input should be a valid date" in plain
    assert "Expected: type YYYY-MM-DD" in plain
    new_id = re.findall(r"registered\W+([0-9a-f-]{36})", plain)[-1]
    shown = json.loads(run_cli(home, "show", new_id, "--json").stdout)
    assert shown["date_of_birth"] == {"value": "1988-03-14", "precision": "exact"}
    assert shown["names"]["given"] == "Amina" and shown["situation"]["scenario"] == "trapped"


def test_the_duplicate_table_shows_names_as_typed(tmp_path: Path) -> None:
    home = tmp_path / "device"
    assert run_cli(home, "init", "--site", "camp-1", "--operator", "Yusuf").returncode == 0
    earlier = {
        "names": {"given": "Amina [/b]", "family": "Haroun [red]:sparkles:"},
        "sex": "female",
        "nationalities": ["TCD"],
        "date_of_birth": {"value": "1990-01-01", "precision": "estimated"},
        "situation": {"scenario": "trapped"},
        "consent": {
            "given": True,
            "legal_basis": "consent",
            "scope": ["registration"],
            "recorded_by": "Yusuf",
        },
    }
    saved = run_cli(home, "register", "--json", "-", input=json.dumps(earlier))
    assert saved.returncode == 0, saved.stderr
    code, text, _ = _register_in_terminal(home)
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)
    assert code == 0 and "Traceback" not in plain, plain
    assert "Possibly already registered" in plain
    assert "Amina [/b] Haroun [red]:sparkles:" in plain
    assert "records    2" in run_cli(home, "status").stdout
