"""Operator decisions and logins racing each other on a real hub and database."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from server import accounts
from server import devices as device_store
from server.db import make_engine, write_lock
from server.hub import Hub
from server.problems import Problem
from sync.changes import Version
from tests.hubkit import (
    ADMIN_PASSWORD,
    HandDevice,
    database_backends,
    fresh_database,
    init_hub,
    live_hub,
)
from tests.test_duplicates import PASSWORD, add_operator, login, registration


@contextmanager
def _served(backend: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub]]:
    with (
        fresh_database(backend) as url,
        live_hub(init_hub(tmp_path / "hub", url)) as (base, hub),
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        add_operator(hub, "op", ["border", "camp"])
        yield http, hub


@pytest.fixture(params=database_backends())
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub]]:
    with _served(request.param, tmp_path) as served:
        yield served


# On SQLite a push's first read already waits for a held write lock, so a
# revocation cannot be slipped in between its reads and its write: that race
# exists on PostgreSQL only (no parameter, so not collected, without it).
@pytest.fixture(params=[b for b in database_backends() if b == "postgresql"])
def pg_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub]]:
    with _served(request.param, tmp_path) as served:
        yield served


# Each registered once at each site: one duplicate pair per person.
PEOPLE = [
    ({"given": "Mohamed", "family": "Abdel Rahman"}, "1988-03-14", "A1234567"),
    ({"given": "Grace", "family": "Okafor"}, "1990-05-01", "B7654321"),
    ({"given": "Tesfaye", "family": "Bekele"}, "1979-11-23", "C2468013"),
    ({"given": "Fatima", "family": "Diallo"}, "2001-07-09", "D1357924"),
    ({"given": "Yusuf", "family": "Haidari"}, "1995-01-30", "E9753108"),
    ({"given": "Aminata", "family": "Konate"}, "1983-09-17", "F8642097"),
]


def at_once(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Run `calls` in threads released together; their answers in the same order."""
    start = threading.Barrier(len(calls))
    answers: list[httpx.Response | None] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait(timeout=30)
        answers[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(a is not None for a in answers), "a request did not finish"
    return [a for a in answers if a is not None]


def test_a_merge_and_a_reject_of_one_pair_at_once_decide_it_once(
    env: tuple[httpx.Client, Hub],
) -> None:
    http, hub = env
    border = HandDevice.enrol(http, hub, "border")
    camp = HandDevice.enrol(http, hub, "camp")
    for dev in (border, camp):
        edits = [registration(dev, names, dob, doc) for names, dob, doc in PEOPLE]
        dev.open_answer(dev.push(dev.envelope(edits)))
    auth = login(http)
    pairs = http.get("/api/v1/duplicates", headers=auth).json()
    assert len(pairs) == len(PEOPLE)
    for pair in pairs:
        path = f"/api/v1/duplicates/{pair['id']}"
        merge, reject = at_once(
            partial(http.post, f"{path}/merge", headers=auth, json={"survivor": pair["record_a"]}),
            partial(http.post, f"{path}/reject", headers=auth),
        )
        # One decision wins; the other is refused for the pair's new status
        # (not a deadlock answered with 503, nor a second 200 overwriting the first).
        assert sorted([merge.status_code, reject.status_code]) == [200, 409], (
            merge.text,
            reject.text,
        )
        winner, loser = (merge, reject) if merge.status_code == 200 else (reject, merge)
        assert loser.json()["code"] == "duplicate.not_open"
        now = http.get(path, headers=auth).json()
        assert now["status"] == winner.json()["status"]


def test_wrong_passwords_sent_at_once_lock_the_account_as_sent_one_by_one(
    env: tuple[httpx.Client, Hub],
) -> None:
    http, _hub = env
    attempts = 2 * accounts.MAX_FAILED_LOGINS

    def wrong() -> httpx.Response:
        return http.post("/api/v1/auth/token", data={"username": "op", "password": "not it at all"})

    answers = at_once(*[wrong] * attempts)
    codes = sorted(a.status_code for a in answers)
    # Every failure counts: the fifth locks the account and the rest meet the lock.
    assert codes.count(401) == accounts.MAX_FAILED_LOGINS - 1, codes
    assert codes.count(429) == attempts - accounts.MAX_FAILED_LOGINS + 1, codes
    right = http.post("/api/v1/auth/token", data={"username": "op", "password": PASSWORD})
    assert right.status_code == 429


def _waiting_for_a_lock(hub: Hub, count: int) -> None:
    """Return once `count` sessions wait for a lock on the hub's PostgreSQL database."""
    deadline = time.monotonic() + 30
    while True:
        with hub.engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE NOT l.granted AND d.datname = current_database()"
            ).scalar_one()
        if waiting >= count:
            return
        assert time.monotonic() < deadline, "the request never waited for the lock"
        time.sleep(0.05)


def test_a_push_waiting_while_its_device_is_revoked_is_refused(
    pg_env: tuple[httpx.Client, Hub],
) -> None:
    http, hub = pg_env
    dev = HandDevice.enrol(http, hub, "border")
    edit = dev.new_record("Grace")
    answers: list[httpx.Response] = []
    # The push is checked, opened and waits for the write lock while the device
    # is revoked: it must meet the revocation, not slip in after it.
    with hub.engine.begin() as conn:
        write_lock(conn)
        pusher = threading.Thread(target=lambda: answers.append(dev.push(dev.envelope([edit]))))
        pusher.start()
        _waiting_for_a_lock(hub, 1)
        device_store.revoke_device(conn, dev.id, reason="phone lost", now=datetime.now(UTC))
    pusher.join(timeout=60)
    [answer] = answers
    assert answer.status_code == 403 and answer.json()["code"] == "device.revoked", answer.text
    with hub.engine.connect() as conn:
        assert device_store.last_hub_seq(conn) == 0
        kept = conn.execute(sa.text("SELECT reason FROM quarantine")).scalars().all()
    assert kept == ["device.revoked"]


def test_two_revocations_of_one_device_at_once_are_audited_once(
    pg_env: tuple[httpx.Client, Hub],
) -> None:
    http, hub = pg_env
    dev = HandDevice.enrol(http, hub, "border")
    env = {
        **os.environ,
        "FIELDREG_HUB_DATA_DIR": str(hub.settings.data_dir),
        "FIELDREG_HUB_DATABASE_URL": hub.settings.resolved_database_url(),
    }
    command = [sys.executable, "-m", "server", "device", "revoke", dev.id, "--reason", "lost"]
    # Both commands wait for the write lock held here, then run one after the other.
    with hub.engine.begin() as conn:
        write_lock(conn)
        runs = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
        ]
        _waiting_for_a_lock(hub, 2)
    said = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert sorted("already revoked" in out for out in said) == [False, True], said
    with hub.engine.connect() as conn:
        audited = conn.execute(
            sa.text("SELECT target FROM audit_log WHERE action = 'device.revoke'")
        ).scalars()
        assert list(audited) == [f"device:{dev.id}"]


def test_a_login_holds_no_lock_while_it_checks_the_password(
    env: tuple[httpx.Client, Hub], monkeypatch: pytest.MonkeyPatch
) -> None:
    http, hub = env
    inside, go_on = threading.Event(), threading.Event()
    real = accounts.verify_password

    def held_in_argon2(password: str, stored: str) -> bool:
        inside.set()
        assert go_on.wait(60)
        return real(password, stored)

    monkeypatch.setattr(accounts, "verify_password", held_in_argon2)
    answers: list[httpx.Response] = []
    form = {"username": "op", "password": PASSWORD}
    login = threading.Thread(
        target=lambda: answers.append(http.post("/api/v1/auth/token", data=form))
    )
    login.start()
    try:
        assert inside.wait(60)
        # While the password is checked, a writer gets the locks a login takes
        # (on SQLite the database's, on PostgreSQL the user's row) at once.
        impatient = make_engine(hub.settings.resolved_database_url(), busy_timeout_s=2)
        try:
            with impatient.begin() as conn:
                write_lock(conn)
                conn.execute(sa.text("UPDATE users SET failed_logins = 0 WHERE name = 'op'"))
        finally:
            impatient.dispose()
    finally:
        go_on.set()
        login.join(timeout=60)
    [answer] = answers
    assert answer.status_code == 200, answer.text


def test_two_reopens_of_one_conflict_at_once_reopen_it_once(
    env: tuple[httpx.Client, Hub],
) -> None:
    http, hub = env
    a, b = HandDevice.enrol(http, hub, "border"), HandDevice.enrol(http, hub, "border")
    rec = a.new_record("Mohamed")
    a.open_answer(a.push(a.envelope([rec])))
    base = {"situation.needs": Version(rec.version.stamp, a.id)}
    a.open_answer(a.push(a.envelope([a.edit(rec.record_id, {"situation.needs": ["food"]}, base)])))
    b.open_answer(
        b.push(b.envelope([b.edit(rec.record_id, {"situation.needs": ["shelter"]}, base)]))
    )
    token = http.post(
        "/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    [conflict] = http.get("/api/v1/conflicts", headers=auth).json()
    path = f"/api/v1/conflicts/{conflict['id']}"
    for turn in range(3):
        done = http.post(
            f"{path}/resolve", headers=auth, json={"choice": "current", "reason": "asked them"}
        )
        assert done.status_code == 200, done.text
        answers = at_once(
            *[
                partial(
                    http.post,
                    f"{path}/reopen",
                    headers=auth,
                    json={"reason": f"reopen {turn}.{n}"},
                )
                for n in range(2)
            ]
        )
        # One reopens it; the other finds it open (not a second 200 whose
        # write replaced the first reopening's reason).
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 409], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 409)
        assert refused.json()["code"] == "conflict.already_open"
        # Each turn's resolution keeps the reopenings before it: one a turn.
        reopened = http.get(path, headers=auth).json()["resolution"]["reopened"]
        assert len(reopened) == turn + 1
        assert reopened[-1]["reason"] in {f"reopen {turn}.0", f"reopen {turn}.1"}


@pytest.mark.parametrize("backend", database_backends())
def test_two_admins_adding_one_user_name_at_once_add_it_once(backend: str, tmp_path: Path) -> None:
    """The second is told the user exists (on PostgreSQL both pass the check
    before either inserts; its unique index decides), not shown a traceback."""
    with fresh_database(backend) as url:
        hub = Hub(init_hub(tmp_path / "hub", url))
        try:
            start = threading.Barrier(2)
            outcomes: list[str] = []

            def add() -> None:
                start.wait(timeout=30)
                try:
                    with hub.engine.begin() as conn:
                        accounts.add_user(
                            conn,
                            name="amina",
                            role=accounts.Role.HUB_OPERATOR,
                            sites=["border"],
                            password=PASSWORD,
                            now=datetime.now(UTC),
                        )
                    outcomes.append("added")
                except Problem as exc:
                    outcomes.append(exc.code)

            threads = [threading.Thread(target=add, daemon=True) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert sorted(outcomes) == ["added", "user.exists"]
        finally:
            hub.engine.dispose()
