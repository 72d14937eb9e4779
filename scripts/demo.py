"""`make demo`: what a newcomer sees, driven through the real `fieldreg` CLI.

Creates an encrypted field store in ./demo-data, registers sample people
offline (JSON Lines import and one by one), then lists, searches and edits
them, printing each command before running it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo-data"
PASSPHRASE = "demo only: sand lantern river compass"

PEOPLE = [
    {
        "names": {"given": "Mohamed", "family": "Abdel Rahman", "given_original": "محمد"},
        "sex": "male",
        "date_of_birth": {"value": "1988-03-14", "precision": "exact"},
        "nationalities": ["EGY"],
        "documents": [{"type": "passport", "status": "confiscated", "number": "A1234567"}],
        "occupation": "mason",
        "situation": {
            "scenario": "crossed_border",
            "vulnerabilities": [
                "legal_status.documents_confiscated",
                "socio_economic.unpaid_wages",
            ],
            "needs": ["consular_assistance", "evacuation"],
            "intention": "return_home",
        },
    },
    {
        "names": {
            "given_original": "হোসেন",
            "family_original": "মিয়া",
            "given": "Hossain",
            "family": "Miah",
        },
        "sex": "male",
        "date_of_birth": {"value": "1979-01-01", "precision": "year"},
        "nationalities": ["BGD"],
        "situation": {"scenario": "trapped", "needs": ["evacuation", "food"]},
    },
    {
        "names": {"given": "Grace", "family": "Okafor"},
        "sex": "female",
        "nationalities": ["NGA"],
        "situation": {
            "scenario": "crossed_border",
            "vulnerabilities": ["gender_age_health.pregnant"],
            "needs": ["health_referral", "shelter"],
        },
    },
    {
        "names": {"given": "Muhammad", "family": "Osman"},
        "sex": "male",
        "date_of_birth": {"value": "1995-01-01", "precision": "estimated"},
        "nationalities": ["SDN"],
        "situation": {"scenario": "internally_displaced", "needs": ["family_tracing"]},
    },
]


def fieldreg(*args: str, stdin: str | None = None, capture: bool = False) -> str:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"\n$ fieldreg {shown}", flush=True)
    env = {**os.environ, "FIELDREG_HOME": str(DATA / "device-a"), "FIELDREG_PASSPHRASE": PASSPHRASE}
    result = subprocess.run(
        [sys.executable, "-m", "field_client", *args],
        input=stdin,
        text=True,
        env=env,
        capture_output=capture,
        check=True,
    )
    if capture:
        print(result.stdout, end="")
    return result.stdout if capture else ""


def main() -> None:
    shutil.rmtree(DATA, ignore_errors=True)
    consent = {
        "given": True,
        "legal_basis": "consent",
        "scope": ["registration"],
        "recorded_by": "Amina",
    }
    lines = "\n".join(json.dumps({**p, "consent": consent}, ensure_ascii=False) for p in PEOPLE)
    print(
        "fieldreg demo: an encrypted field store, offline (FIELDREG_PASSPHRASE is set for the demo)"
    )
    fieldreg("init", "--site", "ras-jedir", "--operator", "Amina")
    fieldreg("register", "--json", "-", stdin=lines)
    fieldreg("list")
    fieldreg("search", "Mohammed")
    first = fieldreg("search", "محمد", "--limit", "1", capture=True)
    record_id = next(w for w in first.split() if w.count("-") == 4)
    fieldreg("edit", record_id, "--set", "situation.needs=consular_assistance,evacuation,legal_aid")
    fieldreg("show", record_id)
    fieldreg("status")
    print(
        f"\nThe store is in {DATA / 'device-a'}: store.db is SQLCipher-encrypted; store.key holds"
    )
    print(
        "the data key wrapped under the passphrase. Try `fieldreg --help` with FIELDREG_HOME set."
    )


if __name__ == "__main__":
    main()
