"""Network faults between real devices and a real hub (uvicorn on 127.0.0.1),
through the seeded asyncio fault proxy of `tests/faults.py` (no external binary).

- The hub's answer lost after it committed, for every batch, to a `fieldreg
  sync` that then fails and is run again: the hub applies each batch once and
  answers the re-sent batch with its stored acknowledgement, from which the
  device learns its verdicts (a conflict among them).
- A slow link (256 kbit/s each way, 600 ms round trip, stalls of 1-3 s):
  `fieldreg sync` completes and re-sends at most 10% of the bytes a clean
  link carries for the same data.
- Cuts at random byte offsets, in both directions, of pushes and of pull
  pages: nothing is lost or applied twice, and no stored page is fetched again.

Each test prints its seed; FIELDREG_FAULT_SEED replaces it to try others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from bench.people import person
from field_client.enrolment import enrol
from field_client.store import Store
from field_client.sync_runner import run_sync
from schemas.fields import flatten
from schemas.record import RegistrationCreate
from server.hub import Hub
from server.records import load_records
from sync.transport import ENROL_PATH, PULL_PATH, PUSH_PATH, HubClient, HubUnreachable
from tests.conftest import PASSPHRASE, run_cli, sample_record
from tests.faults import Cut, Direction, FaultProxy, LoseAnswer, Request, SlowLink
from tests.hubkit import database_backends, fresh_database, init_hub, live_hub

SEED = int(os.environ.get("FIELDREG_FAULT_SEED", "20261213"))


@pytest.fixture(params=database_backends())
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Hub]]:
    with fresh_database(request.param) as url, live_hub(init_hub(tmp_path / "hub", url)) as live:
        yield live


# -- devices ---------------------------------------------------------------------------------
def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def direct_device(root: Path, name: str, url: str, hub: Hub, sites: list[str]) -> Store:
    """An enrolled device, used in this process, that talks to the hub directly."""
    store = Store.init(root / name, PASSPHRASE, site=sites[0], operator=name, kdf_memory_kib=1024)
    with httpx.Client(base_url=url) as http:
        enrol(
            store,
            HubClient(http),
            code=hub.create_enrol_code(sites, timedelta(hours=1), request_id="test-enrol"),
        )
    return store


def proxied_device(root: Path, name: str, hub_url: str, hub: Hub, sites: list[str]) -> Path:
    """A store enrolled through `hub_url` (a proxy): `fieldreg sync` goes there."""
    home = root / name
    with (
        Store.init(home, PASSPHRASE, site=sites[0], operator=name, kdf_memory_kib=1024) as store,
        httpx.Client(base_url=hub_url) as http,
    ):
        enrol(
            store,
            HubClient(http),
            code=hub.create_enrol_code(sites, timedelta(hours=1), request_id="test-enrol"),
        )
        enrolment = store.sync.read_enrolment()
        assert enrolment is not None and enrolment.hub_url == hub_url
    return home


def direct_sync(store: Store, url: str) -> None:
    with httpx.Client(base_url=url) as http:
        run_sync(store, HubClient(http))


def fieldreg_sync(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(home, "sync", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def crowd(rng: random.Random, n: int, *, notes_chars: int = 0) -> list[RegistrationCreate]:
    """`n` people; with `notes_chars`, each has a case note of about that length,
    in made-up words that compress about as well as real text does."""
    syllables = [a + b for a in "bdfghjklmnprstwyz" for b in "aeiou"]

    def note() -> str:
        words: list[str] = []
        size = 0
        while size < notes_chars:
            words.append("".join(rng.choices(syllables, k=rng.randint(1, 4))))
            size += len(words[-1]) + 1
        return " ".join(words)[:4000]

    return [
        RegistrationCreate.model_validate(person(rng) | ({"notes": note()} if notes_chars else {}))
        for _ in range(n)
    ]


def edits_made(store: Store) -> int:
    return len({c.version for c in store.outbox(after_seq=0, limit=1_000_000)})


# -- the two sides' views ----------------------------------------------------------------
def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v not in (None, [])}


def device_state(store: Store, site: str) -> dict[str, dict[str, Any]]:
    return {s.id: _clean(flatten(store.get(s.id))) for s in store.list_records(site=site)}


def hub_state(hub: Hub, site: str) -> dict[str, dict[str, Any]]:
    with hub.engine.connect() as conn:
        stmt = sa.text("SELECT id FROM records WHERE site = :s")
        ids = [r[0] for r in conn.execute(stmt, {"s": site})]
        recs = load_records(conn, ids, hub.secrets.master_key)
    return {rid: _clean({p: f["v"] for p, f in rec.fields.items()}) for rid, rec in recs.items()}


def hub_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def scalar(hub: Hub, sql: str, **params: Any) -> Any:
    with hub.engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def changes_of(hub: Hub, device_id: str) -> tuple[int, int]:
    """(change rows, distinct device sequences) the hub holds from a device."""
    stmt = sa.text("SELECT count(*), count(DISTINCT device_seq) FROM changes WHERE device_id = :d")
    with hub.engine.connect() as conn:
        rows, seqs = conn.execute(stmt, {"d": device_id}).one()
    return int(rows), int(seqs)


# -- the hub's answer lost after it committed ----------------------------------------------
def test_an_enrolment_whose_answer_was_lost_is_run_again_with_the_same_code(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    enrols = [0]

    def plan(request: Request) -> LoseAnswer | None:
        if request.path != ENROL_PATH:
            return None
        enrols[0] += 1
        return LoseAnswer() if enrols[0] == 1 else None  # the hub enrols, the device hears nothing

    home = tmp_path / "dev"
    code = live.create_enrol_code(["ras-jedir"], timedelta(hours=1), request_id="test-enrol")
    Store.init(home, PASSPHRASE, site="ras-jedir", operator="amina", kdf_memory_kib=1024).close()
    with FaultProxy(port_of(url), plan) as proxy:
        lost = run_cli(home, "enrol", "--hub", proxy.url, "--code", code)
        assert lost.returncode == 2 and "hub unreachable" in lost.stderr, lost.stderr
        assert "run again" in lost.stderr and "Traceback" not in lost.stderr
        # The hub holds the device; the code is spent. The same command again
        # presents the same keys and is answered as the first time would have been.
        again = run_cli(home, "enrol", "--hub", proxy.url, "--code", code)
        assert again.returncode == 0, again.stderr
        with Store.open(home, PASSPHRASE) as store:
            store.register([RegistrationCreate.model_validate(sample_record())])
        assert fieldreg_sync(home).returncode == 0
    assert int(scalar(live, "SELECT count(*) FROM devices")) == 1
    assert int(scalar(live, "SELECT count(*) FROM records")) == 1
    enrolled = "SELECT count(*) FROM audit_log WHERE action = 'device.enrol'"
    assert int(scalar(live, enrolled)) == 2
    # Anyone else presenting the spent code, or other keys, is refused as before.
    other = tmp_path / "other"
    Store.init(other, PASSPHRASE, site="ras-jedir", operator="x", kdf_memory_kib=1024).close()
    refused = run_cli(other, "enrol", "--hub", url, "--code", code)
    assert refused.returncode == 2 and "enrol.code_invalid" in refused.stderr


def test_answers_lost_after_commit_are_recovered_from_the_stored_acks(
    tmp_path: Path, hub: tuple[str, Hub], caplog: pytest.LogCaptureFixture
) -> None:
    url, live = hub
    site = "ras-jedir"
    pushes = [0]

    def plan(request: Request) -> LoseAnswer | None:
        if request.path != PUSH_PATH:
            return None
        pushes[0] += 1
        return LoseAnswer() if pushes[0] % 2 == 1 else None  # every batch's first answer

    other = direct_device(tmp_path, "other", url, live, [site])
    with FaultProxy(port_of(url), plan) as proxy, other:
        [shared] = other.register([RegistrationCreate.model_validate(sample_record())])
        direct_sync(other, url)
        home = proxied_device(tmp_path, "dev", proxy.url, live, [site])
        with Store.open(home, PASSPHRASE) as store:
            direct_sync(store, proxy.url)  # pulls the shared record; nothing to push
        rid = str(shared.id)
        other.edit(rid, {"occupation": "cook"})
        direct_sync(other, url)
        with Store.open(home, PASSPHRASE) as store:
            store.edit(rid, {"occupation": "driver"})  # concurrent with the cook: a conflict
            store.register(crowd(random.Random(SEED), 40))
            device_id, made = store.device_id, edits_made(store)
        runs: list[subprocess.CompletedProcess[str]] = []
        while not runs or runs[-1].returncode != 0:
            assert len(runs) < 12, "sync did not finish"
            runs.append(fieldreg_sync(home, "--max-batch-bytes", "16384"))
        lost = proxy.fired(PUSH_PATH)
        sent = proxy.requests_to(PUSH_PATH)

    batches = int(scalar(live, "SELECT count(*) FROM batches WHERE device_id = :d", d=device_id))
    assert batches >= 3
    # Each run lost one answer (the first run's, then the batch after the one it re-sent).
    assert len(runs) == batches + 1
    for failed in runs[:-1]:
        assert failed.returncode == 2
        assert "hub unreachable" in failed.stderr and "nothing lost, run again" in failed.stderr
    assert len(lost) == batches and {r.fault_kind for r in lost} == {"lost"}
    assert all(r.down_bytes == 0 and r.up_bytes == r.request.length for r in lost)
    assert sent == 2 * batches  # every batch sent twice: once lost, once answered from storage
    # The last run got the stored acknowledgement of the last batch.
    summary = re.search(r"acknowledged (\d+) \((\d+) duplicates\)", runs[-1].stdout)
    assert summary is not None and summary[1] == summary[2] != "0", runs[-1].stdout
    # The hub applied each batch once.
    assert changes_of(live, device_id) == (made, made)
    assert int(scalar(live, "SELECT count(*) FROM records")) == 41
    assert int(scalar(live, "SELECT count(*) FROM conflicts")) == 1
    high_water = int(scalar(live, "SELECT high_water FROM devices WHERE id = :d", d=device_id))
    with live.engine.connect() as conn:
        acks = [
            json.loads(a)
            for (a,) in conn.execute(
                sa.text("SELECT ack FROM batches WHERE device_id = :d"), {"d": device_id}
            )
        ]
    assert sum(len(a["conflicts"]) for a in acks) == 1
    # The device stored what the re-sent answers said, the conflict included.
    with Store.open(home, PASSPHRASE) as store:
        status = store.sync.status()
        assert store.sync.pending_count() == 0
        assert status.pushed_seq == status.last_seq == high_water
        assert status.lost_edits == 1 and status.quarantined == 0
        assert device_state(store, site) == hub_state(live, site)
    assert hub_errors(caplog) == []


# -- a slow link with stalls ---------------------------------------------------------------
@dataclass(frozen=True)
class Carried:
    up: int
    down: int
    seconds: float
    runs: int


def test_slow_link_with_stalls_completes_and_resends_under_a_tenth(tmp_path: Path) -> None:
    """200 people with case notes (about 235 KB sealed) through 256 kbit/s each
    way, a 600 ms round trip and stalls of 1-3 s every 60-140 KB, against the
    same data through a clean link: the slow sync completes and carries at most
    10% more bytes either way.

    The device waits at most 6 s for the hub (`--hub-timeout 6`), longer than
    any stall, and sends 512 KiB batches whose first takes about 6 s to upload:
    the upload alone outlasts the timeout, as a 256 KiB batch of incompressible
    data outlasts the default 60 s on a 32 kbit/s link. The kernel takes the
    batch at once, so the wait for the answer starts while it is still on its
    way; `sync.transport` allows for the request's size, and without that each
    run times out and re-sends the batch for ever.

    SQLite only: the slow link costs about 20 s, and what it tests (timeouts and
    re-sends) is the device's, not the database's.
    """
    seed = SEED + 1
    print(f"\nslow link seed {seed}")
    people = crowd(random.Random(seed), 200, notes_chars=2000)
    carried: dict[str, Carried] = {}
    with live_hub(init_hub(tmp_path / "hub")) as (url, live):
        peer = direct_device(tmp_path, "peer", url, live, ["field-x"])
        with peer:  # something to pull, the same for both devices
            peer.register(crowd(random.Random(seed + 1), 100))
            direct_sync(peer, url)
        link = SlowLink()
        for name, shaped in (("clean", None), ("slow", link)):
            with FaultProxy(port_of(url), link=shaped, seed=seed) as proxy:
                home = proxied_device(tmp_path, name, proxy.url, live, [f"{name}-site", "field-x"])
                with Store.open(home, PASSPHRASE) as store:
                    store.register(people)
                up, down, start = proxy.bytes_up, proxy.bytes_down, time.monotonic()
                runs = 0
                while True:
                    runs += 1
                    result = fieldreg_sync(
                        home, "--hub-timeout", "6", "--max-batch-bytes", str(512 * 1024)
                    )
                    if result.returncode == 0:
                        break
                    assert runs < 3, f"{name}: sync did not finish: {result.stderr}"
                carried[name] = Carried(
                    proxy.bytes_up - up, proxy.bytes_down - down, time.monotonic() - start, runs
                )
                stalls = proxy.stalls
            with Store.open(home, PASSPHRASE) as store:
                device_id = store.device_id
                assert store.sync.pending_count() == 0
                assert changes_of(live, device_id) == (200, 200)
                assert len(device_state(store, f"{name}-site")) == 200
                assert device_state(store, "field-x") == hub_state(live, "field-x")
                assert len(hub_state(live, "field-x")) == 100
    clean, slow = carried["clean"], carried["slow"]
    print(f"clean {clean}\nslow  {slow}\nstalls {stalls}")
    assert stalls, "the slow link never stalled: the test did not test stalls"
    # The link really was that slow: the push alone needs its bytes over 32 KB/s.
    assert slow.seconds >= clean.up / link.bytes_per_s
    assert slow.up <= 1.10 * clean.up
    assert slow.down <= 1.10 * clean.down


# -- cuts in both directions, of pushes and of pull pages ------------------------------------
def test_cuts_at_random_offsets_in_pushes_and_pull_pages_lose_nothing(
    tmp_path: Path, hub: tuple[str, Hub], caplog: pytest.LogCaptureFixture
) -> None:
    url, live = hub
    seed = SEED + 2
    print(f"\ncuts seed {seed}")
    rng = random.Random(seed)
    site, limit, max_batch_bytes = "dehiba", 60, 16 * 1024
    # Which requests of each path to cut, counting retries: each index is reached
    # whatever the cuts before it did, since a path needs at least that many
    # requests (6+ batches, 5+ pages). Up and down in turn, at random offsets.
    targets = {PUSH_PATH: set(rng.sample(range(6), 4)), PULL_PATH: set(rng.sample(range(5), 3))}
    turns: dict[str, list[Direction]] = {PUSH_PATH: ["up", "down"], PULL_PATH: ["down", "up"]}
    seen = dict.fromkeys(targets, 0)

    def plan(request: Request) -> Cut | None:
        if request.path not in targets:
            return None
        seen[request.path] += 1
        if seen[request.path] - 1 not in targets[request.path]:
            return None
        turn = turns[request.path]
        turn.append(turn.pop(0))
        return Cut(turn[-1], rng.random())

    peer = direct_device(tmp_path, "peer", url, live, [site])
    with peer:
        peer.register(crowd(rng, 300))
        direct_sync(peer, url)
        peer_edits = edits_made(peer)
    device = direct_device(tmp_path, "dev", url, live, [site])
    with device, FaultProxy(port_of(url), plan, seed=seed) as proxy:
        device.register(crowd(rng, 100))
        attempts = 0
        while True:
            attempts += 1
            assert attempts <= 40, "sync did not finish"
            try:
                with httpx.Client(base_url=proxy.url) as http:
                    run_sync(
                        device, HubClient(http), max_batch_bytes=max_batch_bytes, pull_limit=limit
                    )
                break
            except HubUnreachable:
                continue
        cut = proxy.fired()
        pushes = proxy.requests_to(PUSH_PATH)
        answered_pulls = sum(
            1 for r in proxy.requests if r.request.path == PULL_PATH and r.answered
        )
        assert device.sync.pending_count() == 0
        made = edits_made(device)
        assert device_state(device, site) == hub_state(live, site)
        assert len(device.list_records(site=site)) == 400
    print(f"attempts {attempts}, cuts {[(r.request.path, r.fault) for r in cut]}")
    assert len(cut) == 7  # every planned cut fired
    assert {(r.request.path, r.fault_kind) for r in cut} == {
        (path, kind) for path in (PUSH_PATH, PULL_PATH) for kind in ("up", "down")
    }
    assert attempts == len(cut) + 1  # every cut failed one run, and only that
    assert int(scalar(live, "SELECT count(*) FROM records")) == 400
    assert changes_of(live, device.device_id) == (made, made)
    assert changes_of(live, peer.device_id) == (peer_edits, peer_edits)
    batches = int(
        scalar(live, "SELECT count(*) FROM batches WHERE device_id = :d", d=device.device_id)
    )
    assert batches >= 6
    assert pushes - batches <= 4  # a cut push re-sent its batch once, no other
    # Pages stored before a cut were not fetched again.
    pages = math.ceil(peer_edits / limit)
    assert pages <= answered_pulls <= pages + 1
    assert hub_errors(caplog) == []  # a cut upload is no error of the hub's
