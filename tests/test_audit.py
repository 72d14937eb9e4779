"""The audit log on a real hub database: appended, verified, then tampered with
by raw SQL from outside the hub's code (sqlite3 on `hub.db`, psycopg on
PostgreSQL), each tampering found at the entry where it happened."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from server import audit
from server.audit_commands import register
from server.hub import Hub
from tests.hubkit import database_backends, fresh_database, init_hub

EVERY = 25  # a checkpoint every 25 entries, so a few hundred entries carry a dozen


@pytest.fixture(params=database_backends())
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    with fresh_database(request.param) as url:
        hub = Hub(init_hub(tmp_path / "hub", url))
        try:
            yield hub
        finally:
            hub.engine.dispose()


def append(hub: Hub, now: datetime, **overrides: Any) -> int:
    fields: dict[str, Any] = {
        "actor": "user:amina",
        "action": "record.read",
        "target": "record:6f1c0c1e-0000-4000-8000-000000000001",
        "request_id": "req-1",
        "detail": {"fields": 3, "sites": ["ras-jedir"]},
        **overrides,
    }
    with hub.engine.begin() as conn:
        return audit.append(
            conn, now=now, signer=hub.secrets.keys, checkpoint_every=EVERY, **fields
        )


def fill(hub: Hub, n: int = 300, step: timedelta = timedelta(seconds=1)) -> list[int]:
    start = datetime.now(UTC)
    return [
        append(hub, start + i * step, actor=f"user:{i % 7}", request_id=f"req-{i}")
        for i in range(n)
    ]


def check(hub: Hub, *, checkpoint_every: int | None = EVERY) -> audit.Verification:
    with hub.engine.connect() as conn:
        return audit.verify(
            conn, hub.public_keys.signing_public_key(), checkpoint_every=checkpoint_every
        )


def marks(hub: Hub) -> list[Any]:
    with hub.engine.connect() as conn:
        return list(conn.execute(sa.select(audit.checkpoints).order_by(audit.checkpoints.c.id)))


def tamper(hub: Hub, *statements: str) -> None:
    """Run SQL on the database itself, from outside the hub's code."""
    url = hub.settings.database_url
    if url is None:
        conn = sqlite3.connect(hub.settings.data_dir / "hub.db")
        with conn:
            for statement in statements:
                conn.execute(statement)
        conn.close()
        return
    import psycopg

    with psycopg.connect(url) as pg:
        for statement in statements:
            pg.execute(statement)


def test_an_untouched_log_is_intact(hub: Hub) -> None:
    ids = fill(hub)
    assert ids == list(range(ids[0], ids[0] + 300))
    result = check(hub)
    assert result == audit.Verification(True, ids[-1], len(marks(hub)), None, "intact")
    new = [m.entry_id for m in marks(hub) if m.entry_id >= ids[0]]
    assert len(new) >= 300 // EVERY and all(b - a == EVERY for a, b in pairwise(new))


def test_a_checkpoint_is_also_written_when_the_last_is_ten_minutes_old(hub: Hub) -> None:
    ids = fill(hub, 20, step=timedelta(minutes=3))
    times = [m.at for m in marks(hub) if m.entry_id >= ids[0]]
    assert len(times) >= 4
    assert all(b - a == timedelta(minutes=12) for a, b in pairwise(times[1:]))
    assert check(hub).is_intact


def test_entries_hold_what_was_given_to_the_millisecond(hub: Hub) -> None:
    now = datetime(2026, 11, 29, 10, 0, 0, 123456, tzinfo=UTC)
    entry_id = append(hub, now, detail={"b": 2, "a": [1, "x"]})
    with hub.engine.connect() as conn:
        (row,) = audit.recent(conn, limit=1)
    assert row["id"] == entry_id and row["at"] == "2026-11-29T10:00:00.123+00:00"
    assert row["detail"] == {"a": [1, "x"], "b": 2}
    assert check(hub).is_intact


def test_append_refuses_naive_times_and_over_long_fields(hub: Hub) -> None:
    with pytest.raises(ValueError, match="timezone"):
        append(hub, datetime(2026, 11, 29, 10, 0))
    with pytest.raises(ValueError, match="actor"):
        append(hub, datetime.now(UTC), actor="x" * 129)
    with pytest.raises(ValueError):
        append(hub, datetime.now(UTC), detail={"n": float("nan")})


def test_text_a_database_cannot_hold_is_stored_replaced(hub: Hub) -> None:
    append(hub, datetime.now(UTC), target="batch:a\x00b\ud800", detail={"k": "\ud800"})
    with hub.engine.connect() as conn:
        (row,) = audit.recent(conn, limit=1)
    assert row["target"] == "batch:a\ufffdb?" and row["detail"] == {"k": "?"}
    assert check(hub).is_intact


@dataclass(frozen=True)
class Case:
    """One way to tamper: the SQL, and the entry at which verify must stop."""

    name: str
    attack: Callable[[Hub, list[int], list[int]], tuple[list[str], int]]
    says: str


def _edit_actor(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    return [f"UPDATE audit_log SET actor = 'user:someone' WHERE id = {ids[137]}"], ids[137]


def _edit_detail(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    return [f"UPDATE audit_log SET detail = '{{\"fields\":0}}' WHERE id = {ids[40]}"], ids[40]


def _edit_and_rehash_one(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    # The attacker knows the format and fixes the edited row's own hash: the
    # next entry no longer follows it.
    target = ids[137]
    with hub.engine.connect() as conn:
        row = conn.execute(sa.select(audit.entries).where(audit.entries.c.id == target)).one()
    digest = audit.entry_hash(
        row.prev_hash,
        id=row.id,
        at=row.at,
        actor="user:someone",
        action=row.action,
        target=row.target,
        request_id=row.request_id,
        detail=json.loads(row.detail),
    )
    sql = f"UPDATE audit_log SET actor = 'user:someone', hash = '{digest}' WHERE id = {target}"
    return [sql], target + 1


def _rewrite_to_the_end(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    # Rewrite one entry and re-chain everything after it: only a signed
    # checkpoint can tell, so verify stops at the first one after the edit.
    target = ids[137]
    with hub.engine.connect() as conn:
        rows = list(
            conn.execute(
                sa.select(audit.entries)
                .where(audit.entries.c.id >= target)
                .order_by(audit.entries.c.id)
            )
        )
    statements, prev = [], rows[0].prev_hash
    for row in rows:
        actor = "user:someone" if row.id == target else row.actor
        digest = audit.entry_hash(
            prev,
            id=row.id,
            at=row.at,
            actor=actor,
            action=row.action,
            target=row.target,
            request_id=row.request_id,
            detail=json.loads(row.detail),
        )
        statements.append(
            f"UPDATE audit_log SET actor = '{actor}', prev_hash = '{prev}', hash = '{digest}'"
            f" WHERE id = {row.id}"
        )
        prev = digest
    return statements, min(c for c in cps if c >= target)


def _delete_row(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    return [f"DELETE FROM audit_log WHERE id = {ids[137]}"], ids[137]


def _delete_first_row(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    return ["DELETE FROM audit_log WHERE id = 1"], 1


def _swap_rows(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    a, b = ids[100], ids[101]
    return [
        f"UPDATE audit_log SET id = -1 WHERE id = {a}",
        f"UPDATE audit_log SET id = {a} WHERE id = {b}",
        f"UPDATE audit_log SET id = {b} WHERE id = -1",
    ], a


def _truncate_tail(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    keep = cps[-1] - 3  # the last checkpoint now names an entry that is gone
    return [f"DELETE FROM audit_log WHERE id > {keep}"], keep + 1


def _forge_signature(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    (mark,) = [m for m in marks(hub) if m.entry_id == cps[5]]
    message = audit.checkpoint_message(
        checkpoint_id=mark.id, entry_id=mark.entry_id, entry_hash=mark.entry_hash, at=mark.at
    )
    forged = Ed25519PrivateKey.generate().sign(message).hex()
    return [f"UPDATE audit_checkpoints SET signature = '{forged}' WHERE id = {mark.id}"], cps[5]


def _move_checkpoint(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    # Point a genuine checkpoint at another entry, with that entry's hash.
    with hub.engine.connect() as conn:
        other = conn.execute(
            sa.select(audit.entries.c.hash).where(audit.entries.c.id == cps[5] + 1)
        ).scalar_one()
    sql = (
        f"UPDATE audit_checkpoints SET entry_id = {cps[5] + 1}, entry_hash = '{other}'"
        f" WHERE entry_id = {cps[5]}"
    )
    return [sql], cps[5]


def _delete_middle_checkpoint(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    return [f"DELETE FROM audit_checkpoints WHERE entry_id = {cps[5]}"], cps[5]


def _delete_last_checkpoint(hub: Hub, ids: list[int], cps: list[int]) -> tuple[list[str], int]:
    return [f"DELETE FROM audit_checkpoints WHERE entry_id = {cps[-1]}"], cps[-1]


CASES = [
    Case("edit an actor", _edit_actor, "does not match its hash"),
    Case("edit a detail", _edit_detail, "does not match its hash"),
    Case("edit and re-hash one row", _edit_and_rehash_one, "does not follow"),
    Case("rewrite and re-chain to the end", _rewrite_to_the_end, "differ from signed checkpoint"),
    Case("delete a row", _delete_row, "is missing"),
    Case("delete the first row", _delete_first_row, "entry 1 is missing"),
    Case("swap two rows", _swap_rows, "does not follow"),
    Case("truncate the tail past a checkpoint", _truncate_tail, "truncated"),
    Case("forge a checkpoint signature", _forge_signature, "bad signature"),
    Case("move a checkpoint", _move_checkpoint, "should carry a checkpoint"),
    Case("delete a checkpoint", _delete_middle_checkpoint, "should carry a checkpoint"),
    Case("delete the last checkpoint", _delete_last_checkpoint, "should carry a checkpoint"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tampering_is_found_where_it_happened(hub: Hub, case: Case) -> None:
    ids = fill(hub)
    cps = [m.entry_id for m in marks(hub)]
    statements, broken_at = case.attack(hub, ids, cps)
    tamper(hub, *statements)
    result = check(hub)
    assert not result.is_intact
    assert result.first_broken_id == broken_at, result
    assert case.says in result.reason
    assert result.entries in (broken_at - 1, broken_at)  # all before the break were checked


def test_a_deleted_checkpoint_leaves_a_gap_even_without_the_cadence(hub: Hub) -> None:
    fill(hub)
    cps = [m.entry_id for m in marks(hub)]
    tamper(hub, f"DELETE FROM audit_checkpoints WHERE entry_id = {cps[5]}")
    result = check(hub, checkpoint_every=None)
    assert result.first_broken_id == cps[6] and "is missing (deleted)" in result.reason


def test_what_verify_cannot_see_tail_cut_with_its_checkpoints(hub: Hub) -> None:
    """The documented limit: cutting the tail *and* the checkpoints that covered
    it leaves a valid shorter log. Only an archive kept elsewhere shows it."""
    fill(hub)
    cps = [m.entry_id for m in marks(hub)]
    keep = cps[-2] + 3
    tamper(
        hub,
        f"DELETE FROM audit_log WHERE id > {keep}",
        f"DELETE FROM audit_checkpoints WHERE entry_id > {keep}",
    )
    result = check(hub)
    assert result.is_intact and result.entries == keep


def test_concurrent_appends_keep_one_chain(hub: Hub) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                append(hub, datetime.now(UTC), request_id=f"w{k}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with hub.engine.connect() as conn:
        assert len(audit.recent(conn, limit=1000)) >= 80
    assert check(hub).is_intact


def test_export_is_enough_to_verify_elsewhere(hub: Hub) -> None:
    """An archive can re-check the chain and the signatures with only the
    documented format and the hub's public signing key."""
    ids = fill(hub, 60)
    with hub.engine.connect() as conn:
        items = list(audit.export(conn, since=None))
    key = hub.public_keys.signing_public_key()
    prev, last_id = audit.GENESIS_HASH, 0
    for item in items:
        if item["kind"] == "checkpoint":
            assert item["entry_id"] == last_id and item["entry_hash"] == prev
            message = audit.checkpoint_message(
                checkpoint_id=item["id"],
                entry_id=item["entry_id"],
                entry_hash=item["entry_hash"],
                at=datetime.fromisoformat(item["at"]),
            )
            key.verify(bytes.fromhex(item["signature"]), message)
            continue
        body = {k: item[k] for k in ("id", "at", "actor", "action", "target", "request_id")}
        canonical = json.dumps(
            {**body, "detail": item["detail"]},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        digest = hashlib.sha256(bytes.fromhex(prev) + canonical.encode()).hexdigest()
        assert item["id"] == last_id + 1 and item["prev_hash"] == prev and item["hash"] == digest
        prev, last_id = digest, item["id"]
    assert last_id == ids[-1]


def test_export_since_starts_at_the_first_entry_at_or_after_it(hub: Hub) -> None:
    ids = fill(hub, 60, step=timedelta(minutes=1))
    with hub.engine.connect() as conn:
        at = {e["id"]: e["at"] for e in audit.recent(conn, limit=100)}
        since = datetime.fromisoformat(at[ids[30]])
        items = list(audit.export(conn, since=since))
        future = list(audit.export(conn, since=since + timedelta(days=1)))
    entries = [i["id"] for i in items if i["kind"] == "entry"]
    assert entries == ids[30:] and future == []
    assert all(i["entry_id"] >= ids[30] for i in items if i["kind"] == "checkpoint")


def test_recent_is_newest_first_and_filters(hub: Hub) -> None:
    ids = fill(hub, 30)
    append(hub, datetime.now(UTC), actor="user:zed", action="user.login")
    with hub.engine.connect() as conn:
        page = audit.recent(conn, limit=5, offset=1)
        zed = audit.recent(conn, limit=10, actor="user:zed")
        reads = audit.recent(conn, limit=100, action="record.read")
    assert [e["id"] for e in page] == list(range(ids[-1], ids[-1] - 5, -1))
    assert [e["action"] for e in zed] == ["user.login"]
    assert {e["id"] for e in reads} >= set(ids)


text = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    actor=text,
    action=text,
    target=text,
    request_id=text,
    detail=st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(), st.booleans(), st.none(), text, st.lists(st.integers())),
    ),
)
def test_the_hash_is_of_the_documented_canonical_json(
    actor: str, action: str, target: str, request_id: str, detail: dict[str, Any]
) -> None:
    at = datetime(2026, 11, 29, 10, 0, 0, 123000, tzinfo=UTC)
    prev = hashlib.sha256(b"x").hexdigest()
    fields = {"actor": actor, "action": action, "target": target, "request_id": request_id}
    body = {"id": 7, "at": "2026-11-29T10:00:00.123+00:00", "detail": detail, **fields}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(bytes.fromhex(prev) + canonical.encode()).hexdigest()
    assert audit.entry_hash(prev, id=7, at=at, detail=detail, **fields) == expected


# -- the command line -----------------------------------------------------------------------


def cli(hub: Hub, *args: str) -> Any:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as in `fieldreg-hub`
    register(app)
    env = {"FIELDREG_HUB_DATA_DIR": str(hub.settings.data_dir)}
    if hub.settings.database_url:
        env["FIELDREG_HUB_DATABASE_URL"] = hub.settings.database_url
    return CliRunner().invoke(app, list(args), env=env)


def test_cli_verify_says_intact_or_names_the_broken_entry(hub: Hub) -> None:
    ids = fill(hub, 60)
    ok = cli(hub, "audit", "verify")
    assert ok.exit_code == 0, ok.output
    assert f"checked {ids[-1]} entries" in ok.stdout and "intact" in ok.stdout
    tamper(hub, f"UPDATE audit_log SET target = 'record:x' WHERE id = {ids[10]}")
    broken = cli(hub, "audit", "verify")
    assert broken.exit_code == 1
    assert broken.stdout.startswith(f"BROKEN at entry {ids[10]}: ")


def test_cli_export_writes_json_lines(hub: Hub, tmp_path: Path) -> None:
    ids = fill(hub, 40)
    out = tmp_path / "audit.jsonl"
    done = cli(hub, "audit", "export", "--since", "2000-01-01", "--out", str(out))
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in lines if x["kind"] == "entry"] == list(range(1, ids[-1] + 1))
    to_stdout = cli(hub, "audit", "export", "--since", "2000-01-01T00:00:00Z")
    assert to_stdout.exit_code == 0
    assert [json.loads(line) for line in to_stdout.stdout.splitlines()] == lines


def test_cli_export_since_an_offset_past_either_end_of_the_calendar(hub: Hub) -> None:
    ids = fill(hub, 5)
    first = cli(hub, "audit", "export", "--since", "0001-01-01T00:00:00+05:00")
    assert first.exit_code == 0, first.output
    entries = [json.loads(line) for line in first.stdout.splitlines()]
    assert [x["id"] for x in entries if x["kind"] == "entry"] == list(range(1, ids[-1] + 1))
    last = cli(hub, "audit", "export", "--since", "9999-12-31T23:59:59-05:00")
    assert last.exit_code == 0, last.output
    assert last.stdout == ""


def test_cli_export_refuses_a_bad_since(hub: Hub) -> None:
    bad = cli(hub, "audit", "export", "--since", "last tuesday")
    assert bad.exit_code == 2
    assert bad.stderr.count("\n") == 1 and "--since" in bad.stderr and not bad.stdout


def test_cli_verify_as_an_operator_runs_it(tmp_path: Path) -> None:
    hub = Hub(init_hub(tmp_path / "hub"))
    try:
        ids = fill(hub, 30)
    finally:
        hub.engine.dispose()
    env = {**os.environ, "FIELDREG_HUB_DATA_DIR": str(tmp_path / "hub")}
    env.pop("FIELDREG_HUB_DATABASE_URL", None)
    run = subprocess.run(
        [sys.executable, "-m", "server", "audit", "verify"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert f"checked {ids[-1]} entries" in run.stdout and "intact" in run.stdout
