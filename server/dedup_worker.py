"""The hub's duplicate checker: checks the records pushes queued, after the
pushes have answered.

A push files the records it changed in `dedup_pending`, in its own
transaction (so a crash between the two loses nothing). One background thread
per hub process takes them in chunks, each chunk in one transaction under the
write lock (one checker at a time across processes), and readers of the
duplicate queue call `check_all_pending` first so they never miss a record.
The work itself is `server.dedup_check`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from server import dedup_check
from server.db import write_lock

__all__ = ["DuplicateChecker"]

log = logging.getLogger("fieldreg.hub")


class DuplicateChecker:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        index: dedup_check.BlockIndex,
        master_key: bytes,
        cache: dedup_check.ProfileCache,
        now: Callable[[], datetime],
    ) -> None:
        self._engine = engine
        self._index = index
        self._master_key = master_key
        self._cache = cache
        self._now = now
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

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
            try:
                checked = self.check_pending()
            except Exception:  # a locked or lost database: try again later
                log.exception("duplicate check failed; retrying in 5 s")
                self._stop.wait(5)
                continue
            if not checked:
                self._wake.wait(2.0)
                self._wake.clear()
