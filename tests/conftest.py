"""Shared fixtures: real SQLCipher stores in temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from field_client.store import Store

PASSPHRASE = "correct horse battery staple"


def sample_record(**overrides: Any) -> dict[str, Any]:
    """A valid registration as a form would send it."""
    record: dict[str, Any] = {
        "names": {"given": "Mohamed", "family": "Abdel Rahman", "given_original": "محمد"},
        "sex": "male",
        "date_of_birth": {"value": "1988-03-14", "precision": "exact"},
        "nationalities": ["EGY"],
        "languages": ["ar"],
        "documents": [{"type": "passport", "status": "confiscated", "number": "A1234567"}],
        "phone": "+218 91 234 5678",
        "occupation": "mason",
        "employer": "Tripoli Build Co",
        "situation": {
            "scenario": "crossed_border",
            "vulnerabilities": [
                "legal_status.documents_confiscated",
                "socio_economic.unpaid_wages",
            ],
            "needs": ["consular_assistance", "evacuation"],
            "intention": "return_home",
        },
        "consent": {
            "given": True,
            "legal_basis": "consent",
            "scope": ["registration", "consular_notification"],
            "recorded_by": "Amina",
        },
    }
    record.update(overrides)
    return record


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A store made by `fieldreg init` (the CLI), for tests that drive the CLI."""
    data = tmp_path / "device"
    result = run_cli(data, "init", "--site", "ras-jedir", "--operator", "Amina")
    assert result.returncode == 0, result.stderr
    return data


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.init(tmp_path / "dev", PASSPHRASE, site="ras-jedir", operator="Amina")
    try:
        yield s
    finally:
        s.close()


def run_cli(
    data_dir: Path, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `fieldreg` in a real subprocess against `data_dir`."""
    full_env = {
        **os.environ,
        "FIELDREG_HOME": str(data_dir),
        "FIELDREG_PASSPHRASE": PASSPHRASE,
        "COLUMNS": "200",
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "field_client", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )
