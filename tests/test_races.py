"""Operator decisions and logins racing each other on a real hub and database."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server import accounts
from server.hub import Hub
from tests.hubkit import (
    database_backends,
    fresh_database,
    init_hub,
    live_hub,
)
from tests.test_duplicates import PASSWORD, add_operator


@pytest.fixture(params=database_backends())
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub]]:
    with (
        fresh_database(request.param) as url,
        live_hub(init_hub(tmp_path / "hub", url)) as (base, hub),
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        add_operator(hub, "op", ["border", "camp"])
        yield http, hub


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
