"""Pushing the outbox: sealed batches, one in flight, the mark moved only by the hub.

While the hub works on one batch the device reads and seals the next one
and hands it to the courier (the worker thread that talks to the hub). When
the acknowledgement confirms the whole batch (the usual case) the courier
sends that next batch at once, before the main thread even hears of the
answer; the acknowledgement is stored while the hub works on that batch,
once the batch after it is read, sealed and handed over too. An answer that
confirms less drops the sealed batch, and the next one is read from
wherever the mark then is. The batch that follows a confirmed one is the
same whether it was read before or after the mark moved, so ids and digests
are those a plain send-wait-store loop would give (only its header's
`sent_at_ms` is a little earlier). A lost connection re-sends only the
batch in flight (its predecessor's answer is stored before that batch's
answer is awaited); a crash before an answer is stored re-sends that batch
and the one in flight, and the hub answers both as duplicates."""

from __future__ import annotations

import threading
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
_SENT_WAIT_S = 0.05  # the longest the main thread waits for a request to be written


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
    against the batch, or its refusal; and the batch that followed, when the
    courier sent it on this answer."""

    ack: Ack | None
    refusal: HubProblem | None
    follow: _InFlight | None = None


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
    """Carries sealed batches to the hub on one worker thread, one at a time.

    `start` sends a batch. `hand_over` gives the courier the batch that
    follows the one in flight: the worker sends it the moment the answer it
    waits for confirms the whole batch in flight, before the main thread hears
    of that answer, so the hub waits for no thread switch and no sealing. A
    batch handed over too late (the answer came first), or after an answer
    that confirms less, is not sent: the caller decides what goes next.
    """

    def __init__(self, pool: ThreadPoolExecutor, client: HubClient, link: Link) -> None:
        self._pool = pool
        self._client = client
        self._link = link
        self._lock = threading.Lock()
        self._waiting = False  # a batch is in flight and its answer has not come
        self._next: _Sealed | None = None

    def start(self, sealed: _Sealed) -> _InFlight:
        with self._lock:
            self._waiting, self._next = True, None
        sent = threading.Event()
        return _InFlight(sealed, self._pool.submit(self._exchange, sealed, sent), sent)

    def hand_over(self, sealed: _Sealed) -> None:
        with self._lock:
            if self._waiting:
                self._next = sealed

    def _take_next(self) -> _Sealed | None:
        with self._lock:
            following, self._waiting, self._next = self._next, False, None
        return following

    def _exchange(self, sealed: _Sealed, sent: threading.Event) -> _Reply:
        try:
            try:
                answer = self._client.push(sealed.envelope, on_sent=sent.set)
            except HubProblem as problem:
                return _Reply(None, problem)
            finally:
                sent.set()
            ack_header, body = open_answer(answer, self._link, kind="ack")
            ack = _parse_ack(body, ack_header, sealed.header)
        finally:
            following = self._take_next()
        if following is None or ack.high_water != sealed.header.seq_last:
            return _Reply(ack, None)
        # The whole batch is in: what follows goes out now (the worker takes it next).
        return _Reply(ack, None, self.start(following))


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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fieldreg-push") as pool:
        courier = _Courier(pool, client, link)

        def send(batch: PushBatch | None) -> _InFlight | None:
            return None if batch is None else courier.start(_seal(link, batch, wall_ms))

        in_flight = send(store.sync.outbox_batch(max_batch_bytes))
        unstored: tuple[Ack, Header] | None = None  # the answer to the batch before
        while in_flight is not None:
            in_flight.wait_sent()
            header = in_flight.sealed.header
            summary.sent_batches += 1
            summary.sent_changes += header.seq_last - header.seq_first + 1
            try:
                # Read and seal the next batch while the hub works on this one,
                # then store the answer to the one before (it need not hold up the next).
                batch = store.sync.outbox_batch(max_batch_bytes, after_seq=header.seq_last)
                following = None if batch is None else _seal(link, batch, wall_ms)
                if following is not None:
                    courier.hand_over(following)
            finally:
                if unstored is not None:
                    tally.store_ack(*unstored)
                    unstored = None
            reply = in_flight.reply.result()
            if reply.ack is None:
                assert reply.refusal is not None
                new_mark, is_duplicate = _after_refusal(store, reply.refusal, on_revoked)
                tally.moved_to(new_mark, header, is_duplicate)
            elif reply.ack.high_water == header.seq_last:
                # The whole batch is in: what follows it is on its way (or goes now),
                # and this answer is stored before the next one is awaited.
                in_flight = reply.follow
                if in_flight is None and following is not None:
                    in_flight = courier.start(following)
                if in_flight is None:
                    tally.store_ack(reply.ack, header)
                else:
                    unstored = (reply.ack, header)
                continue
            else:
                tally.store_ack(reply.ack, header)
            # The next batch starts wherever the mark now is.
            in_flight = send(store.sync.outbox_batch(max_batch_bytes))
