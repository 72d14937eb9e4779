"""The hub's duplicate checker: checks the records pushes queued, after the
pushes have answered.

A push files the records it changed in `dedup_pending`, in its own
transaction (so a crash between the two loses nothing). One background thread
per hub process takes them in chunks, each chunk in one transaction under the
write lock (one checker at a time across processes), and readers of the
duplicate queue call `check_all_pending` first so they never miss a record.
The work itself is `server.dedup_check`.

The thread lets pushes go first: while pushes are arriving (one in progress,
or one ended less than `idle_s` ago) it waits, so a burst of pushes is merged
without the scoring competing for the CPU (and, in one process, the GIL).
It never waits more than `max_hold_s` in a row: under pushes that never
pause, checking starts after that and shares the time with them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import sqlalchemy as sa

from server import dedup_check, match_profiles
from server.db import write_lock

__all__ = ["DuplicateChecker"]

log = logging.getLogger("fieldreg.hub")

IDLE_S = 0.5  # how long no push must arrive before the background check starts
MAX_HOLD_S = 10.0  # the longest the background check waits for pushes to pause


class DuplicateChecker:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        index: dedup_check.BlockIndex,
        master_key: bytes,
        cache: match_profiles.ProfileCache,
        now: Callable[[], datetime],
        idle_s: float = IDLE_S,
        max_hold_s: float = MAX_HOLD_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._index = index
        self._master_key = master_key
        self._cache = cache
        self._now = now
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._idle_s = idle_s
        self._max_hold_s = max_hold_s
        self._monotonic = monotonic
        self._pushes_lock = threading.Lock()
        self._pushes = 0  # pushes in progress
        self._last_push = -float("inf")  # when the last one ended
        self._held_since: float | None = None  # when the check began to wait for pushes

    @contextmanager
    def push_arriving(self) -> Iterator[None]:
        """Around a push: the background check waits while pushes arrive."""
        with self._pushes_lock:
            self._pushes += 1
        try:
            yield
        finally:
            with self._pushes_lock:
                self._pushes -= 1
                self._last_push = self._monotonic()

    def hold_off_s(self) -> float:
        """Seconds the background check should still wait for pushes to pause
        (0.0: check now). Waiting ends at an idle moment, or after `max_hold_s`
        in a row; after that it is 0.0 until pushes pause once."""
        now = self._monotonic()
        with self._pushes_lock:
            quiet_s = now - self._last_push
            if not self._pushes and quiet_s >= self._idle_s:
                self._held_since = None
                return 0.0
            if self._held_since is None:
                self._held_since = now
            left = self._max_hold_s - (now - self._held_since)
            if left <= 0:
                return 0.0
            wait = self._idle_s if self._pushes else self._idle_s - quiet_s
            return min(wait, left)

    def check_pending(self, limit: int = 200) -> int:
        """Check up to `limit` queued records for possible duplicates, in one
        transaction; return how many were checked (0: the queue is empty)."""
        with self._engine.begin() as conn:
            write_lock(conn)  # one checker at a time, across hub processes too
            ids = dedup_check.take_pending(conn, limit)
            if ids:
                dedup_check.check_records(
                    conn,
                    ids,
                    index=self._index,
                    master_key=self._master_key,
                    now=self._now(),
                    cache=self._cache,
                )
                dedup_check.clear_pending(conn, ids)
        return len(ids)

    def check_all_pending(self, budget_s: float | None = None) -> int:
        """Check queued records until none is left or `budget_s` seconds have
        passed; return how many are still queued. Readers of the duplicate
        queue call it first, so they see every pushed record checked."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        while self.check_pending():
            if deadline is not None and time.monotonic() > deadline:
                with self._engine.connect() as conn:
                    return dedup_check.count_pending(conn)
        return 0

    def wake(self) -> None:
        """Something was queued: check now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        """Run `check_pending` in a background thread until `stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fieldreg-dedup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            hold = self.hold_off_s()
            if hold > 0:
                self._stop.wait(hold)
                continue
            try:
                checked = self.check_pending()
            except Exception:  # a locked or lost database: try again later
                log.exception("duplicate check failed; retrying in 5 s")
                self._stop.wait(5)
                continue
            if not checked:
                self._wake.wait(2.0)
                self._wake.clear()
