"""The sync loop: push the outbox in sealed batches, then pull pages from the hub.

The position advances only on the hub's answer (as litestream does): the
pushed mark moves after an acknowledgement is opened and checked, or to where
the hub says it stands (`batch.gap`, `envelope.replayed`); the pull cursor
moves with the page it belongs to, in the same transaction. So a dropped
connection loses nothing: the next run re-sends at most the batch that was in
flight, under the same id, and the hub acknowledges it as a duplicate.

Every envelope from the hub is opened with the hub keys pinned at enrolment
(never keys the hub sends later), and must be addressed to this device and be
of the expected kind. The runner decides; `Store.sync` holds all the SQL.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import quote

from field_client.store import Store
from field_client.sync_store import Enrolment, HubAheadOfStore, PullPosition
from schemas.record import SCHEMA_VERSION
from sync.envelope import PROTOCOL_VERSION, EnvelopeError, Header, open_sealed, seal
from sync.hlc import system_ms
from sync.http_signature import sign_request
from sync.protocol import Edit, ProtocolError, dumps
from sync.transport import PULL_PATH, HubClient, HubProblem, HubUnreachable

__all__ = [
    "BASE_DELAY_S",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_PULL_LIMIT",
    "MAX_DELAY_S",
    "DeviceRevoked",
    "NotEnrolled",
    "Progress",
    "SyncError",
    "SyncSummary",
    "run_sync",
    "watch",
]

DEFAULT_MAX_BATCH_BYTES = 256 * 1024
DEFAULT_PULL_LIMIT = 500
_MAX_STALLS = 3  # batches in a row that do not move the pushed mark before giving up
BASE_DELAY_S = 1.0
MAX_DELAY_S = 300.0

# progress(phase, done, total): phase "push" (total = changes to send) or
# "pull" (total unknown: None).
Progress = Callable[[str, int, int | None], None]


class SyncError(Exception):
    """Sync cannot go on; `code` is stable and dotted, `detail` a sentence for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class NotEnrolled(SyncError):
    def __init__(self) -> None:
        super().__init__(
            "device.not_enrolled",
            "this device is not enrolled with a hub: run `fieldreg enrol --hub URL --code CODE`",
        )


class DeviceRevoked(SyncError):
    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "device.revoked",
            "the hub has revoked this device and ordered it wiped; nothing was deleted"
            " here: hand the device to your coordinator" + (f" (hub: {detail})" if detail else ""),
        )


@dataclass
class SyncSummary:
    """What one sync run (or a whole watch) did. Counts of changes unless named batches."""

    sent_batches: int = 0
    sent_changes: int = 0
    acknowledged: int = 0  # own changes the hub has confirmed (the mark moved over them)
    duplicates: int = 0  # of those, changes the hub had applied before
    received_edits: int = 0
    conflicts: int = 0  # own changes that opened a conflict at the hub
    superseded: int = 0  # own changes that lost to a later write
    quarantined: int = 0

    def add(self, other: SyncSummary) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def has_moved(self) -> bool:
        return bool(self.sent_changes or self.acknowledged or self.received_edits)


def _bad_answer(detail: str) -> HubProblem:
    return HubProblem(200, "hub.bad_answer", detail)


@dataclass(frozen=True)
class _Link:
    """This device as the hub knows it: its id, its keys, the pinned hub keys."""

    device_id: str
    enrolment: Enrolment


def _open(data: bytes, link: _Link, *, kind: str) -> tuple[Header, dict[str, Any]]:
    """Open an envelope from the hub with the PINNED keys; check it is for us; parse its body."""
    try:
        opened = open_sealed(data, sender=link.enrolment.hub_keys, recipient=link.enrolment.keys)
    except EnvelopeError as exc:
        raise SyncError(
            exc.code,
            f"refused the hub's {kind} answer: {exc.detail} (it is not from the hub pinned at"
            " enrolment, or was damaged)",
        ) from None
    header = opened.header
    if (header.kind, header.sender, header.recipient) != (kind, "hub", link.device_id):
        raise SyncError(
            "envelope.misaddressed",
            f"refused an envelope of kind {header.kind!r} from {header.sender!r} to"
            f" {header.recipient!r}: expected {kind!r} from 'hub' to this device",
        )
    try:
        body = json.loads(opened.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad_answer(f"the {kind} body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad_answer(f"the {kind} body is not a JSON object")
    return header, body


def _int(body: dict[str, Any], key: str, where: str) -> int:
    value = body.get(key)
    if type(value) is not int or value < 0:
        raise _bad_answer(f"{where}: {key}: expected a non-negative integer")
    return value


def _seqs(body: dict[str, Any], key: str) -> list[int]:
    value = body.get(key, [])
    if not (isinstance(value, list) and all(type(s) is int for s in value)):
        raise _bad_answer(f"ack: {key}: expected a list of sequence numbers")
    return value


@dataclass(frozen=True)
class _Ack:
    high_water: int
    is_duplicate: bool
    verdicts: dict[int, str]
    epoch: str
    superseded: int = 0  # own changes that lost to a later write
    conflicts: int = 0  # own changes that opened a conflict (won or lost provisionally)
    quarantined: int = 0


def _parse_ack(body: dict[str, Any], header: Header, batch: Header) -> _Ack:
    if header.batch_id != batch.batch_id or body.get("batch_id") != batch.batch_id:
        raise _bad_answer(
            f"the acknowledgement is for batch {header.batch_id}, not {batch.batch_id}"
        )
    if (header.seq_first, header.seq_last) != (batch.seq_first, batch.seq_last):
        raise _bad_answer("the acknowledgement's sequence range is not the batch's")
    high_water = _int(body, "high_water", "ack")
    epoch = body.get("epoch")
    is_duplicate = body.get("duplicate")
    if not isinstance(epoch, str) or not epoch or not isinstance(is_duplicate, bool):
        raise _bad_answer("ack: epoch or duplicate missing")
    superseded, conflicts = _seqs(body, "superseded"), _seqs(body, "conflicts")
    raw_quarantined = body.get("quarantined", [])
    quarantined: dict[int, str] = {}
    if not isinstance(raw_quarantined, list):
        raise _bad_answer("ack: quarantined: expected a list of [seq, reason]")
    for item in raw_quarantined:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and type(item[0]) is int
            and isinstance(item[1], str)
        ):
            raise _bad_answer("ack: quarantined: expected a list of [seq, reason]")
        quarantined[item[0]] = item[1]

    def in_batch(seqs: Iterable[int]) -> set[int]:
        return {s for s in seqs if batch.seq_first <= s <= batch.seq_last}

    # One stored verdict per change, the one a person must act on first:
    # quarantined over conflict (lost or won, an auditor decides) over
    # superseded; the rest of the batch up to the hub's mark is applied.
    verdicts = dict.fromkeys(range(batch.seq_first, min(batch.seq_last, high_water) + 1), "applied")
    verdicts.update(dict.fromkeys(in_batch(superseded), "superseded"))
    verdicts.update(dict.fromkeys(in_batch(conflicts), "conflict"))
    verdicts.update({s: f"quarantined:{quarantined[s]}" for s in in_batch(quarantined)})
    return _Ack(
        high_water,
        is_duplicate,
        verdicts,
        epoch,
        superseded=len(in_batch(superseded)),
        conflicts=len(in_batch(conflicts)),
        quarantined=len(in_batch(quarantined)),
    )


def _revoked(problem: HubProblem, store: Store) -> DeviceRevoked:
    store.sync.mark_revoked()
    return DeviceRevoked(problem.detail)


def _hub_position(problem: HubProblem, key: str) -> int:
    value = problem.extra.get(key)
    if type(value) is not int or value < 0:
        raise _bad_answer(f"{problem.code} without a usable {key}")
    return value


def _reset(store: Store, seq: int) -> None:
    try:
        store.sync.reset_pushed(seq)
    except HubAheadOfStore as exc:
        raise SyncError("device.behind_hub", str(exc)) from None


def _batch_header(link: _Link, edits: list[Edit], wall_ms: Callable[[], int]) -> Header:
    first, last = edits[0].first_seq, edits[-1].last_seq
    assert first is not None and last is not None
    return Header(
        protocol=PROTOCOL_VERSION,
        schema_version=SCHEMA_VERSION,
        kind="push",
        sender=link.device_id,
        recipient="hub",
        batch_id=f"{first}-{last}",  # deterministic: a re-sent batch keeps its id
        seq_first=first,
        seq_last=last,
        sent_at_ms=wall_ms(),
        kem=link.enrolment.hub_keys.kem_algorithm.value,
    )


def _push_one(
    store: Store, client: HubClient, link: _Link, header: Header, body: bytes
) -> tuple[bool, _Ack | None]:
    """Send one batch and store the hub's answer; return (was it a duplicate, the ack).

    On `batch.gap` / `envelope.replayed` the mark goes where the hub says,
    and the caller rebuilds the next batch from there.
    """
    hub_keys, keys = link.enrolment.hub_keys, link.enrolment.keys
    try:
        answer = client.push(seal(header, body, recipient=hub_keys, sender=keys))
    except HubProblem as problem:
        if problem.code == "device.revoked":
            raise _revoked(problem, store) from None
        if problem.code == "batch.gap":  # the hub wants `expected_seq` next
            _reset(store, _hub_position(problem, "expected_seq") - 1)
            return False, None
        if problem.code == "envelope.replayed":  # applied before under another batch id
            _reset(store, _hub_position(problem, "high_water"))
            return True, None
        raise
    ack_header, ack_body = _open(answer, link, kind="ack")
    ack = _parse_ack(ack_body, ack_header, header)
    try:
        store.sync.mark_pushed(ack.high_water, ack.verdicts)
    except HubAheadOfStore as exc:
        raise SyncError("device.behind_hub", str(exc)) from None
    if ack.epoch != store.sync.pull_position().epoch:
        store.sync.restart_pull(ack.epoch)  # a new hub epoch: the old cursor means nothing
    return ack.is_duplicate, ack


def _push(
    store: Store,
    client: HubClient,
    link: _Link,
    summary: SyncSummary,
    *,
    max_batch_bytes: int,
    progress: Progress | None,
    wall_ms: Callable[[], int],
) -> None:
    total = store.sync.pending_count()
    mark = store.sync.pushed_seq()
    stalls = 0
    if progress is not None:
        progress("push", 0, total)
    while edits := store.sync.outbox_edits(max_batch_bytes):
        header = _batch_header(link, edits, wall_ms)
        body = dumps({"edits": [edit.to_json() for edit in edits]})
        summary.sent_batches += 1
        summary.sent_changes += header.seq_last - header.seq_first + 1
        is_duplicate, ack = _push_one(store, client, link, header, body)
        moved, mark = store.sync.pushed_seq() - mark, store.sync.pushed_seq()
        if moved <= 0:
            # A gap sends us back, which is fine a few times; more is a hub bug.
            stalls += 1
            if stalls > _MAX_STALLS:
                raise _bad_answer(f"the hub does not let batch {header.batch_id} through")
            continue
        stalls = 0
        summary.acknowledged += moved
        summary.duplicates += moved if is_duplicate else 0
        if ack is not None:
            summary.superseded += ack.superseded
            summary.conflicts += ack.conflicts
            summary.quarantined += ack.quarantined
        if progress is not None:
            done = summary.acknowledged
            progress("push", done, max(total, done))


def _parse_page(body: dict[str, Any]) -> tuple[list[Edit], str, bool, str]:
    raw_edits, cursor = body.get("edits"), body.get("cursor")
    more, epoch = body.get("more"), body.get("epoch")
    if not isinstance(raw_edits, list) or not isinstance(cursor, str):
        raise _bad_answer("pull page: edits or cursor missing")
    if not isinstance(more, bool) or not isinstance(epoch, str) or not epoch:
        raise _bad_answer("pull page: more or epoch missing")
    try:
        edits = [Edit.from_json(item) for item in raw_edits]
    except ProtocolError as exc:
        raise _bad_answer(f"pull page: {exc.code}: {exc.detail}") from None
    if any(edit.hub_seq is None for edit in edits):
        raise _bad_answer("pull page: an edit without its hub sequence")
    return edits, cursor, more, epoch


def _pull(
    store: Store,
    client: HubClient,
    link: _Link,
    summary: SyncSummary,
    *,
    limit: int,
    progress: Progress | None,
    wall_ms: Callable[[], int],
) -> None:
    position = store.sync.pull_position()
    has_restarted = False
    if progress is not None:
        progress("pull", 0, None)
    while True:
        # Percent-encoded here, so the query travels exactly as signed.
        query = f"cursor={quote(position.cursor, safe='')}&limit={limit}"
        headers = sign_request(
            method="GET",
            path=PULL_PATH,
            query=query,
            key_id=link.device_id,
            private_key=link.enrolment.keys.signing,
            created=wall_ms() // 1000,
        )
        try:
            data = client.pull(query, headers)
        except HubProblem as problem:
            if problem.code == "device.revoked":
                raise _revoked(problem, store) from None
            if problem.code == "cursor.invalid" and position.cursor and not has_restarted:
                # The hub no longer knows the cursor (a new epoch): pull from the
                # start; merging what is already here again changes nothing.
                store.sync.restart_pull(position.epoch)
                position, has_restarted = store.sync.pull_position(), True
                continue
            raise
        _, body = _open(data, link, kind="pull")
        edits, cursor, has_more, epoch = _parse_page(body)
        if epoch != position.epoch and position.cursor and not has_restarted:
            store.sync.restart_pull(epoch)  # the cursor was from another epoch
            position, has_restarted = store.sync.pull_position(), True
            continue
        store.sync.apply_pull(edits, cursor=cursor, epoch=epoch)
        summary.received_edits += len(edits)
        if progress is not None:
            progress("pull", summary.received_edits, None)
        if not has_more:
            return
        if cursor == position.cursor and not edits:
            raise _bad_answer("the hub says there is more but does not move the cursor")
        position = PullPosition(cursor, epoch)


def run_sync(
    store: Store,
    client: HubClient,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    pull_limit: int = DEFAULT_PULL_LIMIT,
    progress: Progress | None = None,
    wall_ms: Callable[[], int] = system_ms,
) -> SyncSummary:
    """Push every pending change, then pull every page; return what happened.

    Each acknowledged batch and each pulled page is stored as it arrives, so
    when this raises (`HubUnreachable`, `HubProblem`, `SyncError`) everything
    confirmed so far is kept and the next run resumes, re-sending at most the
    batch that was in flight. Raises `NotEnrolled` before any contact, and
    `DeviceRevoked` when the hub has revoked the device (the store is marked
    revoked; nothing is deleted).
    """
    enrolment = store.sync.read_enrolment()
    if enrolment is None:
        raise NotEnrolled()
    if store.sync.status().is_revoked:
        raise DeviceRevoked()
    link = _Link(store.device_id, enrolment)
    summary = SyncSummary()
    _push(
        store,
        client,
        link,
        summary,
        max_batch_bytes=max_batch_bytes,
        progress=progress,
        wall_ms=wall_ms,
    )
    _pull(store, client, link, summary, limit=pull_limit, progress=progress, wall_ms=wall_ms)
    return summary


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, HubUnreachable):
        return True
    return isinstance(exc, HubProblem) and (exc.status >= 500 or exc.status == 429)


def watch(
    store: Store,
    client: HubClient,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    progress: Progress | None = None,
    on_run: Callable[[SyncSummary | Exception], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
    wall_ms: Callable[[], int] = system_ms,
    base_delay_s: float = BASE_DELAY_S,
    max_delay_s: float = MAX_DELAY_S,
) -> SyncSummary:
    """Sync again and again until interrupted (KeyboardInterrupt); return the totals.

    Between runs it waits `base_delay_s`, doubling up to `max_delay_s` for
    each run in a row that moved nothing or could not reach the hub (or got
    a 5xx/429); a run that moves data starts over at `base_delay_s`. Each
    wait is jittered down to half its length (`jitter()` in [0, 1)) so that
    devices back online together do not call at once. `on_run` sees each
    run's summary or transient error. Any other error (revoked, refused, not
    enrolled) ends the watch by propagating.
    """
    total = SyncSummary()
    idle_runs = 0
    try:
        while True:
            try:
                summary = run_sync(
                    store,
                    client,
                    max_batch_bytes=max_batch_bytes,
                    progress=progress,
                    wall_ms=wall_ms,
                )
            except (HubUnreachable, HubProblem) as exc:
                if not _is_transient(exc):
                    raise
                if on_run is not None:
                    on_run(exc)
                idle_runs += 1
            else:
                total.add(summary)
                if on_run is not None:
                    on_run(summary)
                idle_runs = 0 if summary.has_moved else idle_runs + 1
            doublings = min(max(idle_runs - 1, 0), 32)
            delay_s = min(base_delay_s * 2**doublings, max_delay_s)
            sleep(delay_s * (0.5 + 0.5 * jitter()))
    except KeyboardInterrupt:
        return total
