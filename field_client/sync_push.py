"""Pushing the outbox: sealed batches, one in flight, the mark moved only by the hub.

While the hub works on one batch the device reads the next one; when the
acknowledgement confirms the whole batch (the usual case) that next batch
goes out at once and the acknowledgement is stored while the hub works on
it. The batch that follows a confirmed one is the same whether it was read
before or after the mark moved, so ids and digests are those a plain
send-wait-store loop would give. A lost connection re-sends only the batch
in flight (its predecessor's answer is stored before that batch's answer is
awaited); a crash while an answer is being stored re-sends that batch and
the one in flight, and the hub answers both as duplicates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from field_client.store import Store
from field_client.sync_link import Link, Progress, SyncError, SyncSummary, bad_answer, open_answer
from field_client.sync_store import HubAheadOfStore
from schemas.record import SCHEMA_VERSION
from sync.envelope import PROTOCOL_VERSION, Header, seal
from sync.protocol import Ack, ProtocolError, PushBatch
from sync.transport import HubClient, HubProblem

__all__ = ["Verdicts", "push_outbox", "verdicts"]

_MAX_STALLS = 3  # batches in a row that do not move the pushed mark before giving up


@dataclass(frozen=True)
class Verdicts:
    """What to store for one acknowledged batch: every device seq in `applied`
    applied, except those in `others` (seq → verdict); and how many changes of
    the batch the hub listed as superseded, conflicts and quarantined (a
    change may be listed twice: superseded, and a conflict)."""

    applied: range
    others: dict[int, str]
    superseded: int = 0
    conflicts: int = 0
    quarantined: int = 0


def verdicts(ack: Ack, batch: Header) -> Verdicts:
    """The verdict to store per change of `batch`, from its acknowledgement.

    One verdict per change, the one a person must act on first: quarantined
    over conflict (lost or won, an auditor decides) over superseded; the rest
    of the batch up to the hub's mark is applied.
    """

    def in_batch(seqs: Iterable[int]) -> set[int]:
        return {s for s in seqs if batch.seq_first <= s <= batch.seq_last}

    superseded, conflicts = in_batch(ack.superseded), in_batch(ack.conflicts)
    reasons = dict(ack.quarantined)
    quarantined = in_batch(reasons)
    others = dict.fromkeys(superseded, "superseded")
    others.update(dict.fromkeys(conflicts, "conflict"))
    others.update({s: f"quarantined:{reasons[s]}" for s in quarantined})
    return Verdicts(
        range(batch.seq_first, min(batch.seq_last, ack.high_water) + 1),
        others,
        superseded=len(superseded),
        conflicts=len(conflicts),
        quarantined=len(quarantined),
    )


def _parse_ack(body: object, header: Header, batch: Header) -> Ack:
    try:
        ack = Ack.from_json(body)
    except ProtocolError as exc:
        raise bad_answer(f"ack: {exc.detail}") from None
    if header.batch_id != batch.batch_id or ack.batch_id != batch.batch_id:
        raise bad_answer(
            f"the acknowledgement is for batch {header.batch_id}, not {batch.batch_id}"
        )
    if (header.seq_first, header.seq_last) != (batch.seq_first, batch.seq_last):
        raise bad_answer("the acknowledgement's sequence range is not the batch's")
    return ack


def _header(link: Link, batch: PushBatch, wall_ms: Callable[[], int]) -> Header:
    return Header(
        protocol=PROTOCOL_VERSION,
        schema_version=SCHEMA_VERSION,
        kind="push",
        sender=link.device_id,
        recipient="hub",
        batch_id=f"{batch.first_seq}-{batch.last_seq}",  # deterministic: a re-sent batch keeps it
        seq_first=batch.first_seq,
        seq_last=batch.last_seq,
        sent_at_ms=wall_ms(),
        kem=link.enrolment.hub_keys.kem_algorithm.value,
    )


@dataclass
class _InFlight:
    header: Header
    answer: Future[bytes]


def _send(
    pool: ThreadPoolExecutor,
    client: HubClient,
    link: Link,
    batch: PushBatch,
    wall_ms: Callable[[], int],
) -> _InFlight:
    header = _header(link, batch, wall_ms)
    keys, hub_keys = link.enrolment.keys, link.enrolment.hub_keys

    def send() -> bytes:
        return client.push(seal(header, batch.body, recipient=hub_keys, sender=keys))

    return _InFlight(header, pool.submit(send))


def _reset(store: Store, seq: int) -> None:
    try:
        store.sync.reset_pushed(seq)
    except HubAheadOfStore as exc:
        raise SyncError("device.behind_hub", str(exc)) from None


def _hub_position(problem: HubProblem, key: str) -> int:
    value = problem.extra.get(key)
    if type(value) is not int or value < 0:
        raise bad_answer(f"{problem.code} without a usable {key}")
    return value


def _after_refusal(
    store: Store, problem: HubProblem, on_revoked: Callable[[HubProblem], Exception]
) -> tuple[int, bool]:
    """Act on the hub's refusal of a batch: move the mark where the hub says and
    return (the mark, whether the batch was applied before); raise any other
    refusal, or `on_revoked(problem)` for a revoked device."""
    if problem.code == "device.revoked":
        raise on_revoked(problem) from None
    if problem.code == "batch.gap":  # the hub wants `expected_seq` next
        _reset(store, _hub_position(problem, "expected_seq") - 1)
        return store.sync.pushed_seq(), False
    if problem.code == "envelope.replayed":  # applied before under another batch id
        _reset(store, _hub_position(problem, "high_water"))
        return store.sync.pushed_seq(), True
    raise problem


def _store_ack(store: Store, ack: Ack, found: Verdicts) -> int:
    try:
        return store.sync.mark_pushed(ack.high_water, found.others, applied=found.applied)
    except HubAheadOfStore as exc:
        raise SyncError("device.behind_hub", str(exc)) from None


def _count(summary: SyncSummary, moved: int, is_duplicate: bool, found: Verdicts | None) -> None:
    summary.acknowledged += moved
    summary.duplicates += moved if is_duplicate else 0
    if found is not None:
        summary.superseded += found.superseded
        summary.conflicts += found.conflicts
        summary.quarantined += found.quarantined


def push_outbox(
    store: Store,
    client: HubClient,
    link: Link,
    summary: SyncSummary,
    *,
    max_batch_bytes: int,
    progress: Progress | None,
    wall_ms: Callable[[], int],
    on_revoked: Callable[[HubProblem], Exception],
) -> None:
    """Push every pending change; count what happened in `summary`.

    Raises what the transport raises (the batch in flight is re-sent next
    time), `on_revoked(problem)` when the hub revoked the device, `SyncError`
    when the hub claims more than this store made.
    """
    total, mark = store.sync.pending_count(), store.sync.pushed_seq()
    epoch = store.sync.pull_position().epoch
    stalls = 0
    if progress is not None:
        progress("push", 0, total)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fieldreg-push") as pool:

        def send(batch: PushBatch | None) -> _InFlight | None:
            return None if batch is None else _send(pool, client, link, batch, wall_ms)

        in_flight = send(store.sync.outbox_batch(max_batch_bytes))
        while in_flight is not None:
            header = in_flight.header
            summary.sent_batches += 1
            summary.sent_changes += header.seq_last - header.seq_first + 1
            # Read the next batch while the hub works on this one.
            following = store.sync.outbox_batch(max_batch_bytes, after_seq=header.seq_last)
            found: Verdicts | None = None
            try:
                ack_header, body = open_answer(in_flight.answer.result(), link, kind="ack")
            except HubProblem as problem:
                new_mark, is_duplicate = _after_refusal(store, problem, on_revoked)
                is_confirmed = False
            else:
                ack = _parse_ack(body, ack_header, header)
                found, is_duplicate = verdicts(ack, header), ack.is_duplicate
                # The whole batch is in: what follows it goes out before the answer is stored.
                is_confirmed = ack.high_water == header.seq_last
                in_flight = send(following) if is_confirmed else None
                new_mark = _store_ack(store, ack, found)
                if ack.epoch != epoch:  # a new hub epoch: the old cursor means nothing
                    store.sync.restart_pull(ack.epoch)
                    epoch = ack.epoch
            moved, mark = new_mark - mark, new_mark
            if moved <= 0:
                # A gap sends us back, which is fine a few times; more is a hub bug.
                stalls += 1
                if stalls > _MAX_STALLS:
                    raise bad_answer(f"the hub does not let batch {header.batch_id} through")
            else:
                stalls = 0
                _count(summary, moved, is_duplicate, found)
                if progress is not None:
                    progress("push", summary.acknowledged, max(total, summary.acknowledged))
            if not is_confirmed:  # the next batch starts wherever the mark now is
                in_flight = send(store.sync.outbox_batch(max_batch_bytes))
