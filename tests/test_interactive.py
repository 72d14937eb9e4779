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


def _register_in_terminal(home: Path) -> tuple[int, str, int]:
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
                os.write(leader, (scripted(question.strip(), "") + "\n").encode())
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
