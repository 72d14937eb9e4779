"""Field store benchmarks: batch registration through the CLI, search latency,
and what SQLCipher costs against the same store unencrypted."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.people import GROUPS, person
from field_client.store import Store
from schemas.record import RegistrationCreate

__all__ = ["run"]

PASSPHRASE = "benchmark passphrase four words"


def _records(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [person(rng) for _ in range(n)]


def _cli(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FIELDREG_HOME": str(data_dir), "FIELDREG_PASSPHRASE": PASSPHRASE}
    return subprocess.run(
        [sys.executable, "-m", "field_client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )


def bench_cli_register(tmp: Path, n: int = 10_000, runs: int = 3) -> dict[str, float]:
    lines = "\n".join(json.dumps(r) for r in _records(n, seed=1))
    path = tmp / "people.jsonl"
    path.write_text(lines)
    rates = []
    for i in range(runs):
        data = tmp / f"cli-{i}"
        _cli(data, "init", "--site", "bench", "--operator", "bench")
        start = time.perf_counter()
        _cli(data, "register", "--json", str(path))
        rates.append(n / (time.perf_counter() - start))
    return {"records": n, "median_records_per_s": statistics.median(rates)}


def _fill(store: Store, items: list[RegistrationCreate], chunk: int = 5_000) -> float:
    start = time.perf_counter()
    for i in range(0, len(items), chunk):
        store.register(items[i : i + chunk])
    return time.perf_counter() - start


def bench_encryption_cost(tmp: Path, n: int = 10_000) -> dict[str, float]:
    items = [RegistrationCreate.model_validate(r) for r in _records(n, seed=2)]
    timings: dict[str, list[float]] = {"encrypted": [], "plain": []}
    for i in range(3):
        with Store.init(tmp / f"enc-{i}", PASSPHRASE, site="bench", operator="b") as enc:
            timings["encrypted"].append(_fill(enc, items))
        with Store.init_unencrypted_for_benchmark(
            tmp / f"plain-{i}", site="bench", operator="b"
        ) as plain:
            timings["plain"].append(_fill(plain, items))
    enc_s, plain_s = statistics.median(timings["encrypted"]), statistics.median(timings["plain"])
    return {
        "encrypted_records_per_s": n / enc_s,
        "plain_records_per_s": n / plain_s,
        "encrypted_time_ratio": enc_s / plain_s,
    }


def bench_search(tmp: Path, n: int = 100_000, queries: int = 300) -> dict[str, float]:
    items = [RegistrationCreate.model_validate(r) for r in _records(n, seed=3)]
    rng = random.Random(4)
    names = [
        g for _, givens, fams, originals in GROUPS for g in givens + fams + list(originals.values())
    ]
    extra = ["Muhammad", "Mohammed", "Hussain", "Youssef", "Abdul Rahman", "Okafor Grace"]
    with Store.init(tmp / "search", PASSPHRASE, site="bench", operator="b") as store:
        _fill(store, items)
        latencies = []
        for _ in range(queries):
            text = rng.choice(names + extra)
            if rng.random() < 0.5:
                text = f"{text} {rng.choice(names)}"
            start = time.perf_counter()
            store.search(text)
            latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    return {
        "records": n,
        "median_ms": statistics.median(latencies),
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1],
    }


def bench_device_duplicate_check(tmp: Path, n: int = 50_000, probes: int = 200) -> dict[str, float]:
    """The offline check of a new registration against the device's records."""
    items = [RegistrationCreate.model_validate(r) for r in _records(n, seed=5)]
    news = [RegistrationCreate.model_validate(r) for r in _records(probes, seed=6)]
    with Store.init(tmp / "dupcheck", PASSPHRASE, site="bench", operator="b") as store:
        _fill(store, items)
        latencies = []
        flagged = 0
        for item in news:
            start = time.perf_counter()
            flagged += bool(store.possible_duplicates(item))
            latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    return {
        "records": n,
        "median_ms": statistics.median(latencies),
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1],
        "probes_flagged": flagged,
    }


def run() -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="fieldreg-bench-") as tmp:
        root = Path(tmp)
        return {
            "register via `fieldreg register --json` (target >= 1000/s)": bench_cli_register(root),
            "SQLCipher cost, 10k records through the store": bench_encryption_cost(root),
            "search over 100k local records (target p95 <= 50 ms)": bench_search(root),
            "duplicate check against 50k local records (target p95 <= 100 ms)": (
                bench_device_duplicate_check(root)
            ),
        }
