"""Pushing the outbox: sealed batches, one in flight, the mark moved only by the hub.

While the hub works on one batch the device reads and seals the next one.
When the answer comes, it is stored first (the mark and each change's
verdict, in one transaction), and only then does the next batch go out: if
the acknowledgement confirmed the whole batch, the one already sealed, else
one read from wherever the mark then is. The batch that follows a confirmed
one is the same whether it was read before or after the mark moved, so ids
and digests are those a plain send-wait-store loop would give (only its
header's `sent_at_ms` is a little earlier). Whatever stops a push (a lost
connection, Ctrl-C, the process killed), the next run re-sends at most the
one batch that was in flight."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from field_client.store import Store
from field_client.sync_link import (
    Link,
    Progress,
    SyncError,
    SyncSummary,
    bad_answer,
    in_background,
    open_answer,
)
from field_client.sync_store import HubAheadOfStore
from schemas.record import SCHEMA_VERSION
from sync.envelope import PROTOCOL_VERSION, Header, seal
from sync.protocol import Ack, ProtocolError, PushBatch
from sync.transport import HubClient, HubProblem

__all__ = ["Verdicts", "push_outbox", "verdicts"]

_MAX_STALLS = 3  # batches in a row that do not move the pushed mark before giving up
_SENT_WAIT_S = 0.05  # the longest the main thread waits for a request to be written


@dataclass(frozen=True)
class Verdicts:
    """What to store for one acknowledged batch: the verdict on each change the
    hub did not simply apply (seq → verdict); and how many changes of the batch
    it listed as superseded, conflicts and quarantined (a change may be listed
    twice: superseded, and a conflict)."""

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


@dataclass(frozen=True)
class _Sealed:
    """A batch ready for the wire: its header and its envelope."""

    header: Header
    envelope: bytes


def _seal(link: Link, batch: PushBatch, wall_ms: Callable[[], int]) -> _Sealed:
    header = _header(link, batch, wall_ms)
    keys, hub_keys = link.enrolment.keys, link.enrolment.hub_keys
    return _Sealed(header, seal(header, batch.body, recipient=hub_keys, sender=keys))


@dataclass(frozen=True)
class _Reply:
    """The hub's answer to one batch: its acknowledgement, opened and checked
    against the batch, or its refusal."""

    ack: Ack | None
    refusal: HubProblem | None


@dataclass(frozen=True)
class _InFlight:
    """A batch on its way: `sent` is set once its request is written (or has failed)."""

    sealed: _Sealed
    reply: Future[_Reply]
    sent: threading.Event

    def wait_sent(self) -> None:
        """Wait, briefly, until the request is on the wire: the worker writing it
        needs the interpreter's lock, which the main thread's reading would hold."""
        self.sent.wait(_SENT_WAIT_S)


class _Courier:
    """Carries sealed batches to the hub on a thread of their own, one at a time,
    so the main thread can read and seal the next batch meanwhile."""

    def __init__(self, client: HubClient, link: Link) -> None:
        self._client = client
        self._link = link

    def start(self, sealed: _Sealed) -> _InFlight:
        sent = threading.Event()
        work = in_background("fieldreg-push", lambda: self._exchange(sealed, sent))
        return _InFlight(sealed, work, sent)

    def _exchange(self, sealed: _Sealed, sent: threading.Event) -> _Reply:
        try:
            answer = self._client.push(sealed.envelope, on_sent=sent.set)
        except HubProblem as problem:
            return _Reply(None, problem)
        finally:
            sent.set()
        ack_header, body = open_answer(answer, self._link, kind="ack")
        return _Reply(_parse_ack(body, ack_header, sealed.header), None)


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
        return store.sync.mark_pushed(ack.high_water, found.others)
    except HubAheadOfStore as exc:
        raise SyncError("device.behind_hub", str(exc)) from None


def _count(summary: SyncSummary, moved: int, is_duplicate: bool, found: Verdicts | None) -> None:
    summary.acknowledged += moved
    summary.duplicates += moved if is_duplicate else 0
    if found is not None:
        summary.superseded += found.superseded
        summary.conflicts += found.conflicts
        summary.quarantined += found.quarantined


@dataclass
class _Tally:
    """Where the push stands: the mark, the hub's epoch, batches in a row that
    did not move the mark; counts each answer in the summary and reports progress."""

    store: Store
    summary: SyncSummary
    progress: Progress | None
    total: int
    mark: int
    epoch: str
    stalls: int = 0

    def store_ack(self, ack: Ack, header: Header) -> None:
        found = verdicts(ack, header)
        new_mark = _store_ack(self.store, ack, found)
        if ack.epoch != self.epoch:  # a new hub epoch: the old cursor means nothing
            self.store.sync.restart_pull(ack.epoch)
            self.epoch = ack.epoch
        self.moved_to(new_mark, header, ack.is_duplicate, found)

    def moved_to(
        self, new_mark: int, header: Header, is_duplicate: bool, found: Verdicts | None = None
    ) -> None:
        moved, self.mark = new_mark - self.mark, new_mark
        if moved <= 0:
            # A gap sends us back, which is fine a few times; more is a hub bug.
            self.stalls += 1
            if self.stalls > _MAX_STALLS:
                raise bad_answer(f"the hub does not let batch {header.batch_id} through")
            return
        self.stalls = 0
        _count(self.summary, moved, is_duplicate, found)
        if self.progress is not None:
            acknowledged = self.summary.acknowledged
            self.progress("push", acknowledged, max(self.total, acknowledged))


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
    total = store.sync.pending_count()
    tally = _Tally(
        store,
        summary,
        progress,
        total,
        mark=store.sync.pushed_seq(),
        epoch=store.sync.pull_position().epoch,
    )
    if progress is not None:
        progress("push", 0, total)
    courier = _Courier(client, link)

    def send(batch: PushBatch | None) -> _InFlight | None:
        return None if batch is None else courier.start(_seal(link, batch, wall_ms))

    in_flight = send(store.sync.outbox_batch(max_batch_bytes))
    while in_flight is not None:
        in_flight.wait_sent()
        header = in_flight.sealed.header
        summary.sent_batches += 1
        summary.sent_changes += header.seq_last - header.seq_first + 1
        # Read and seal the next batch while the hub works on this one.
        batch = store.sync.outbox_batch(max_batch_bytes, after_seq=header.seq_last)
        following = None if batch is None else _seal(link, batch, wall_ms)
        reply = in_flight.reply.result()
        if reply.ack is None:
            assert reply.refusal is not None
            new_mark, is_duplicate = _after_refusal(store, reply.refusal, on_revoked)
            tally.moved_to(new_mark, header, is_duplicate)
        else:
            tally.store_ack(reply.ack, header)  # before anything else is sent
            if reply.ack.high_water == header.seq_last:
                in_flight = None if following is None else courier.start(following)
                continue
        # The next batch starts wherever the mark now is.
        in_flight = send(store.sync.outbox_batch(max_batch_bytes))
