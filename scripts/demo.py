"""`make demo`: a hub and two field devices, driven through the real CLIs.

1. starts a hub on SQLite on 127.0.0.1 (`fieldreg-hub init`, `serve`);
2. enrols device A at ras-jedir, and device B, a mobile team based at dehiba
   that also covers ras-jedir;
3. registers people offline on each, one person on both devices;
4. syncs; edits one record on both devices while offline; syncs again;
5. prints what the hub holds, the conflict it opened, the possible duplicate
   it queued and its devices, then one record's history on device A;
6. keeps the hub running until Ctrl-C when run from a terminal (otherwise it
   stops the hub; `FIELDREG_DEMO_KEEP_HUB=1` keeps it, `0` stops it).

Every command is printed before it runs, so the output doubles as a tutorial.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo-data"
HUB_DIR = DATA / "hub"
PASSPHRASE = "demo only: sand lantern river compass"
CONSENT = {
    "given": True,
    "legal_basis": "consent",
    "scope": ["registration"],
    "recorded_by": "team",
}

DEVICE_A_PEOPLE: list[dict[str, object]] = [
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
        "names": {
            "given": "Hossain",
            "family": "Miah",
            "given_original": "হোসেন",
            "family_original": "মিয়া",
        },
        "sex": "male",
        "date_of_birth": {"value": "1979-01-01", "precision": "year"},
        "nationalities": ["BGD"],
        "situation": {"scenario": "trapped", "needs": ["evacuation", "food"]},
    },
]
DEVICE_B_PEOPLE: list[dict[str, object]] = [
    # The same man as device A's Hossain Miah, spelled by another team: the hub
    # queues the pair for an operator (`fieldreg-hub dedup list`).
    {
        "names": {"given": "Hussain", "family": "Mia"},
        "sex": "male",
        "date_of_birth": {"value": "1979-01-01", "precision": "year"},
        "nationalities": ["BGD"],
        "situation": {"scenario": "crossed_border", "needs": ["evacuation"]},
    },
    {
        "names": {"given": "Amna", "family": "Ishag"},
        "sex": "female",
        "nationalities": ["SDN"],
        "situation": {"scenario": "internally_displaced", "needs": ["family_tracing", "food"]},
    },
]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(tool: str, *args: str, home: Path | None = None, stdin: str | None = None) -> str:
    module = "field_client" if tool == "fieldreg" else "server"
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    where = f"[{home.name}] " if home else ""
    print(f"$ {where}{tool} {shown}", flush=True)
    env = {**os.environ, "FIELDREG_PASSPHRASE": PASSPHRASE, "FIELDREG_HUB_DATA_DIR": str(HUB_DIR)}
    env["COLUMNS"] = env.get("COLUMNS", "140")
    if home:
        env["FIELDREG_HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", module, *args], input=stdin, text=True, env=env, capture_output=True
    )
    print(result.stdout, end="")
    if result.returncode != 0:
        print(result.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo step failed: {tool} {shown}")
    return result.stdout


def free_port(preferred: int = 8000) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port


def start_hub(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FIELDREG_HUB_DATA_DIR": str(HUB_DIR)}
    print(f"$ fieldreg-hub serve --host 127.0.0.1 --port {port}   (in the background)", flush=True)
    hub = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return hub
        except httpx.TransportError:
            time.sleep(0.2)
    hub.terminate()
    raise SystemExit("the hub did not start")


def code_from(output: str) -> str:
    return next(w for w in output.split() if w.count("-") == 3 and len(w) == 27)


def register(home: Path, people: Sequence[Mapping[str, object]]) -> list[str]:
    lines = "\n".join(json.dumps({**p, "consent": CONSENT}, ensure_ascii=False) for p in people)
    run("fieldreg", "register", "--json", "-", home=home, stdin=lines)
    listed = run("fieldreg", "list", "--json", home=home)
    return [json.loads(line)["id"] for line in listed.splitlines() if line.strip()]


def main() -> None:
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir()
    device_a, device_b = DATA / "device-a", DATA / "device-b"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    say("A hub on SQLite, on this machine")
    run("fieldreg-hub", "init", "--data-dir", str(HUB_DIR))
    hub = start_hub(port)
    try:
        say("Two devices: A at ras-jedir; B, a mobile team based at dehiba also covering ras-jedir")
        run("fieldreg", "init", "--site", "ras-jedir", "--operator", "Amina", home=device_a)
        run("fieldreg", "init", "--site", "dehiba", "--operator", "Yusuf", home=device_b)
        code_a = code_from(run("fieldreg-hub", "enrol-code", "--site", "ras-jedir"))
        run("fieldreg", "enrol", "--hub", url, "--code", code_a, home=device_a)
        code_b = code_from(
            run("fieldreg-hub", "enrol-code", "--site", "dehiba", "--site", "ras-jedir")
        )
        run("fieldreg", "enrol", "--hub", url, "--code", code_b, home=device_b)

        say("Offline registration on each device (the same man is registered on both)")
        register(device_a, DEVICE_A_PEOPLE)
        register(device_b, DEVICE_B_PEOPLE)

        say("A link appears: both devices sync")
        run("fieldreg", "sync", home=device_a)
        run("fieldreg", "sync", home=device_b)
        mohamed = run("fieldreg", "search", "Mohammed", "--limit", "1", home=device_b)
        record_id = next(w for w in mohamed.split() if w.count("-") == 4)

        say("Offline again: both devices change Mohamed's needs, neither seeing the other")
        run(
            "fieldreg",
            "edit",
            record_id,
            "--set",
            "situation.needs=consular_assistance,legal_aid",
            home=device_a,
        )
        run(
            "fieldreg",
            "edit",
            record_id,
            "--set",
            "situation.needs=evacuation,health_referral",
            home=device_b,
        )
        run("fieldreg", "sync", home=device_a)
        run("fieldreg", "sync", home=device_b)
        run("fieldreg", "sync", home=device_a)

        say("What the hub holds now")
        run("fieldreg-hub", "records")
        run("fieldreg-hub", "conflicts")
        run("fieldreg-hub", "dedup", "list")
        run("fieldreg-hub", "device", "list")
        say("Both devices converged (the later edit wins until an auditor decides)")
        run("fieldreg", "show", record_id, home=device_a)

        say("Where to look next")
        print(f"  hub API and OpenAPI:   {url}/docs   {url}/openapi.json")
        print(f"  hub data (keys 0600):  {HUB_DIR}")
        print(f"  device stores:         {device_a}  {device_b}  (passphrase in scripts/demo.py)")
        print("  try: FIELDREG_HOME=demo-data/device-a .venv/bin/fieldreg status")
        keep = os.environ.get("FIELDREG_DEMO_KEEP_HUB", "1" if sys.stdin.isatty() else "0") == "1"
        if keep:
            print("\nThe hub keeps running; press Ctrl-C to stop it.", flush=True)
            while True:
                time.sleep(3600)
        print("\n(not a terminal: stopping the hub; FIELDREG_DEMO_KEEP_HUB=1 keeps it)")
    finally:
        hub.terminate()
        hub.wait(timeout=30)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\nhub stopped")
