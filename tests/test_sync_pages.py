"""Pull pages against a real hub, and the device's look-ahead while it merges.

The hub never sends a device its own edits and moves the cursor past them in
the same answer; a device fetches the next page while it merges one, and a
merge that fails leaves the cursor where the last stored page put it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from field_client.store import Store
from field_client.sync_runner import SyncSummary, run_sync
from schemas.record import RegistrationCreate
from server.hub import Hub
from sync.transport import PULL_PATH, HubClient
from tests.conftest import sample_record
from tests.hubkit import database_backends, fresh_database, init_hub, live_hub
from tests.test_sync_e2e import new_device


@pytest.fixture(params=database_backends())
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Hub]]:
    with fresh_database(request.param) as url, live_hub(init_hub(tmp_path / "hub", url)) as live:
        yield live


def people(count: int, given: str) -> list[RegistrationCreate]:
    return [
        RegistrationCreate.model_validate(sample_record(names={"given": f"{given}{i}"}))
        for i in range(count)
    ]


def sync_counting(store: Store, url: str, **kwargs: Any) -> tuple[Any, int]:
    """Sync `store`; return its summary and how many pull requests it made."""
    pulls = [0]

    def hook(request: httpx.Request) -> None:
        pulls[0] += request.url.path == PULL_PATH

    with httpx.Client(base_url=url, event_hooks={"request": [hook]}) as http:
        return run_sync(store, HubClient(http), **kwargs), pulls[0]


def test_own_edits_are_skipped_in_one_answer_and_others_come_in_pages(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    a = new_device(tmp_path, "a", url, live, sites=["ras-jedir"])
    b = new_device(tmp_path, "b", url, live, sites=["ras-jedir"])
    with a, b:
        a.register(people(12, "Own"))
        summary, pulls = sync_counting(a, url, pull_limit=3)
        assert (summary.received_edits, pulls) == (0, 1)  # twelve own edits, one answer
        b.register(people(5, "Other"))
        assert sync_counting(b, url, pull_limit=3)[0].received_edits == 12
        a.register(people(2, "Later"))
        summary, pulls = sync_counting(a, url, pull_limit=2)
        assert summary.received_edits == 5 and pulls == 3  # 2 + 2 + 1
        assert sync_counting(a, url, pull_limit=2) == (SyncSummary(), 1)  # nothing new
        assert sync_counting(b, url)[0].received_edits == 2
        assert len(a.list_records()) == len(b.list_records()) == 19


def test_a_failed_merge_keeps_the_cursor_of_the_last_stored_page(
    tmp_path: Path, hub: tuple[str, Hub]
) -> None:
    url, live = hub
    a = new_device(tmp_path, "a", url, live, sites=["ras-jedir"])
    b = new_device(tmp_path, "b", url, live, sites=["ras-jedir"])
    with a, b:
        a.register(people(6, "Person"))
        sync_counting(a, url)
        real_apply = b.sync.apply_pull
        calls = [0]

        def failing_apply(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                raise OSError("disk unplugged")
            return real_apply(*args, **kwargs)

        b.sync.apply_pull = failing_apply  # type: ignore[method-assign]
        with pytest.raises(OSError, match="disk unplugged"):
            sync_counting(b, url, pull_limit=2)
        b.sync.apply_pull = real_apply  # type: ignore[method-assign]
        assert len(b.list_records()) == 2  # the first page only
        summary, pulls = sync_counting(b, url, pull_limit=2)
        assert (summary.received_edits, pulls) == (4, 2)
        assert {r.name for r in b.list_records()} == {r.name for r in a.list_records()}
