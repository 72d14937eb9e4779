"""A full duplicate scan (`fieldreg-hub dedup scan`): every record checked
against its candidates again, serially or over worker processes.

Records are taken in id order, in chunks. Each pair is scored once, by the
check of its later record, which looks back at candidates with smaller ids
only; every record is filed under its keys before the first chunk (records
still queued for their check are filed first), so the pairs found depend
neither on the chunks nor on how many processes share the work. A chunk is
read (and reindexed) in one short transaction under the write lock and
scored outside any; the pairs found are queued, and the records taken off
the pending queue, by the calling process, several chunks per transaction.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from server import dedup_check, match_profiles
from server.db import make_engine, write_lock

__all__ = ["TURN_TIMEOUT_S", "ScanStopped", "scan"]

_WRITE_EVERY = 4  # chunks whose pairs are queued in one transaction
TURN_TIMEOUT_S = 300.0
"""The longest this process waits for its turn at the database: a worker holds
it for one chunk (seconds); one that died holding it never gives it back."""


class ScanStopped(RuntimeError):
    """A scan stopped before the end: a worker process died (out of memory,
    killed) or stopped answering. Pairs queued before it stay queued; a scan
    run again finds the rest (known pairs are not queued twice)."""


@contextlib.contextmanager
def _turn_taken(turn: Any) -> Iterator[None]:
    if not turn.acquire(timeout=TURN_TIMEOUT_S):
        raise ScanStopped(
            f"a scoring process held the database for {TURN_TIMEOUT_S:.0f} s: did it stop?"
        )
    try:
        yield
    finally:
        turn.release()


_Checked = tuple[int, list[dedup_check.FoundPair], dict[str, int]]


class _Job:
    """One scan's setting, in whichever process checks its chunks."""

    def __init__(
        self,
        engine: sa.Engine,
        ids: Sequence[str],
        chunk: int,
        master_key: bytes,
        cache: match_profiles.ProfileCache,
        turn: contextlib.AbstractContextManager[Any],
    ) -> None:
        self.engine, self.ids, self.chunk, self.cache, self.turn = engine, ids, chunk, cache, turn
        self.master_key, self.index = master_key, dedup_check.BlockIndex(master_key)

    def check(self, start: int) -> _Checked:
        """Check the chunk from `start`: (records checked, pairs found, their seqs)."""
        part = self.ids[start : start + self.chunk]
        with self.turn, self.engine.begin() as conn:
            write_lock(conn)  # a push's checker may be at work too
            gathered = dedup_check.gather(
                conn,
                part,
                index=self.index,
                master_key=self.master_key,
                cache=self.cache,
                earlier_only=True,
            )
        seqs = {rid: entry.seq for rid, entry in gathered.mine.items()}
        return len(part), dedup_check.score_gathered(gathered), seqs

    def queue(self, found: list[dedup_check.FoundPair], seqs: dict[str, int]) -> int:
        with _turn_taken(self.turn), self.engine.begin() as conn:
            write_lock(conn)
            queued = dedup_check.queue_pairs(conn, found, now=datetime.now(UTC))
            dedup_check.clear_checked(conn, seqs)
        return queued


_job: list[_Job] = []  # in a worker process: its scan


def _start_worker(
    url: str, options: dict[str, Any], ids: list[str], chunk: int, key: bytes, cache: int, turn: Any
) -> None:
    engine = make_engine(url, **options)
    _job.append(_Job(engine, ids, chunk, key, match_profiles.ProfileCache(cache), turn))


def _sqlite_options(engine: sa.Engine) -> dict[str, Any]:
    """The lock wait and memory map of an SQLite engine, for the workers' own."""
    with engine.connect() as conn:
        timeout_ms = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
        mmap_bytes = conn.exec_driver_sql("PRAGMA mmap_size").scalar_one()
    return {"busy_timeout_s": timeout_ms / 1000, "mmap_mb": mmap_bytes // 2**20}


def _check_in_worker(start: int) -> _Checked:
    return _job[0].check(start)


def scan(
    engine: sa.Engine,
    record_ids: Sequence[str],
    *,
    master_key: bytes,
    cache: match_profiles.ProfileCache,
    chunk: int = 500,
    workers: int = 1,
    progress: Callable[[int], None] = lambda checked: None,
    refiling: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Check `record_ids` for possible duplicates, `chunk` records at a time, in
    `workers` processes (1: this one, with `cache`); return how many pairs were
    queued. `progress` is called with how many records each chunk checked.

    First the records whose keys a chunk must count are filed (`refiling` is
    told how many of how many): every record when the blocking index was filed
    by another version of the matcher, else those still queued for their check.

    Raises `ScanStopped` when a worker process dies or stops answering; what
    was queued until then stays queued."""
    if chunk < 1 or workers < 1:
        raise ValueError(f"chunk {chunk} and workers {workers}: each must be at least 1")
    ids = sorted(set(record_ids))
    _refile_first(engine, master_key, chunk, refiling)
    starts = range(0, len(ids), chunk)
    in_memory = engine.url.database in (None, "", ":memory:")
    if workers == 1 or len(starts) <= 1 or in_memory:
        job = _Job(engine, ids, chunk, master_key, cache, threading.Lock())
        return _queue_all(job, map(job.check, starts), progress)
    context = multiprocessing.get_context("spawn")  # nothing of this process's engine is shared
    # The processes take turns at the database: waiting on this lock costs nothing,
    # where SQLite's own busy handler would sleep and poll.
    turn = context.Lock()
    url = engine.url.render_as_string(hide_password=False)
    options = _sqlite_options(engine) if engine.dialect.name == "sqlite" else {}
    setup = (url, options, ids, chunk, master_key, cache.size, turn)
    # concurrent.futures, not multiprocessing.Pool: when a worker dies, a Pool
    # starts another and waits forever for the lost chunk; this raises.
    with ProcessPoolExecutor(
        min(workers, len(starts)), mp_context=context, initializer=_start_worker, initargs=setup
    ) as pool:
        job = _Job(engine, ids, chunk, master_key, cache, turn)
        futures = [pool.submit(_check_in_worker, start) for start in starts]
        try:
            return _queue_all(job, (f.result() for f in as_completed(futures)), progress)
        except BrokenProcessPool as exc:
            raise ScanStopped(f"a scoring process died ({exc})") from None
        finally:
            for future in futures:
                future.cancel()


def _refile_first(
    engine: sa.Engine, master_key: bytes, chunk: int, refiling: Callable[[int, int], None]
) -> None:
    """File, before any chunk is checked, the records whose keys the block sizes
    and weights must count: every record when the index was filed by another
    matcher, else those still queued for their check (a push stored them and
    its check has not run: filed under no key yet, or under keys an edit has
    changed since). Otherwise a chunk would count them only once it, or a
    worker, came to them, and the pairs found would depend on the chunks."""
    with engine.connect() as conn:
        current = dedup_check.index_is_current(conn)
        ids = dedup_check.pending_ids(conn) if current else dedup_check.all_record_ids(conn)
    index = dedup_check.BlockIndex(master_key)
    for start in range(0, len(ids), chunk):
        with engine.begin() as conn:
            write_lock(conn)
            dedup_check.reindex_records(
                conn, ids[start : start + chunk], index=index, master_key=master_key
            )
        refiling(min(start + chunk, len(ids)), len(ids))
    if not current:
        with engine.begin() as conn:
            # Records stored meanwhile were filed by their own checks, with this matcher.
            dedup_check.mark_index_current(conn)


def _queue_all(job: _Job, results: Iterator[_Checked], progress: Callable[[int], None]) -> int:
    queued, found, seqs, held = 0, [], {}, 0
    for checked, pairs, checked_seqs in results:
        found += pairs
        seqs.update(checked_seqs)
        held += 1
        if held == _WRITE_EVERY:
            queued += job.queue(found, seqs)
            found, seqs, held = [], {}, 0
        progress(checked)
    return queued + job.queue(found, seqs)
