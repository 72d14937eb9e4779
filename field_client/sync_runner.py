"""The sync loop: push the outbox in sealed batches, then pull pages from the hub.

The position advances only on the hub's answer (as litestream does): the
pushed mark moves after an acknowledgement is opened and checked, or to where
the hub says it stands (`batch.gap`, `envelope.replayed`); the pull cursor
moves with the page it belongs to, in the same transaction. So a dropped
connection loses nothing: the next run re-sends at most the batch that was in
flight, under the same id, and the hub acknowledges it as a duplicate.

Every envelope from the hub is opened with the hub keys pinned at enrolment
(never keys the hub sends later), and must be addressed to this device and be
of the expected kind. The runner decides; `Store.sync` holds all the SQL. The
push loop (`field_client.sync_push`) keeps one batch in flight while it reads
the next; the pull loop (`field_client.sync_pull`) fetches the next page while
it merges one.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from field_client.store import Store
from field_client.sync_link import (
    DeviceRevoked,
    Link,
    NotEnrolled,
    Progress,
    SyncError,
    SyncSummary,
)
from field_client.sync_pull import pull_pages
from field_client.sync_push import push_outbox
from sync.hlc import system_ms
from sync.transport import HubClient, HubProblem, HubUnreachable

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
DEFAULT_PULL_LIMIT = 1000  # edits per page asked; the hub may send fewer (its own bounds)
BASE_DELAY_S = 1.0
MAX_DELAY_S = 300.0


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

    Each pull page says how far the hub holds this device's changes. When that
    is below the pushed mark, the hub has lost changes it acknowledged (it was
    restored from an older backup): the mark is lowered to the hub's, and the
    run pushes again from there and pulls once more. Changes the hub still
    holds are not sent again.

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
    if store.sync.is_revoked():
        raise DeviceRevoked()
    link = Link(store.device_id, enrolment)
    summary = SyncSummary()

    def revoked(problem: HubProblem) -> DeviceRevoked:
        store.sync.mark_revoked()
        return DeviceRevoked(problem.detail)

    def push() -> None:
        push_outbox(
            store,
            client,
            link,
            summary,
            max_batch_bytes=max_batch_bytes,
            progress=progress,
            wall_ms=wall_ms,
            on_revoked=revoked,
        )

    def pull() -> int | None:
        return pull_pages(
            store,
            client,
            link,
            summary,
            limit=pull_limit,
            progress=progress,
            wall_ms=wall_ms,
            on_revoked=revoked,
        )

    with _heap_frozen():
        push()
        hub_mark = pull()
        if hub_mark is not None and store.sync.lower_pushed(hub_mark):
            # The hub holds fewer of our changes than it acknowledged (restored from an
            # older backup): send again what it lost, then take what came in meanwhile.
            push()
            pull()
    return summary


@contextmanager
def _heap_frozen() -> Iterator[None]:
    """Keep the objects that exist before a sync run out of the cyclic collector's
    scans while it runs, and let young objects pile up more before a collection.

    A run allocates millions of short-lived containers (outbox rows and edits,
    parsed pages, validated records), so the collector runs often, and each
    full collection walks every object in the process (a few hundred thousand
    after imports alone, more in a long-lived one): measured in `bench
    hub_sync`, the collector took a third of the device's pull CPU and half of
    the time spent grouping outbox rows into edits. The hub's server does the
    same for its whole life (`server.cli`). Left as it is when objects are
    frozen already: unfreezing is process-wide.
    """
    if gc.get_freeze_count():
        yield
        return
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


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
