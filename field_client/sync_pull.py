"""Pulling pages from the hub; each page and its cursor are stored together.

While one page is merged into the store the next one is already being
fetched and opened: the cursor it asks from is the one the page being merged
carries, so the requests are exactly those a plain fetch-merge loop would
make. A page fetched ahead is only merged after the page before it was
stored; if that fails, it is dropped and the next run asks again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from urllib.parse import quote

from field_client.store import Store
from field_client.sync_link import (
    Link,
    Progress,
    SyncSummary,
    bad_answer,
    in_background,
    open_answer,
)
from field_client.sync_store import PullPosition
from sync.hlc import ClockOverflow
from sync.http_signature import sign_request
from sync.protocol import ProtocolError, PullPage
from sync.transport import PULL_PATH, HubClient, HubProblem

__all__ = ["pull_pages"]


def _fetch(client: HubClient, link: Link, cursor: str, limit: int, created_s: int) -> PullPage:
    """Ask for the page after `cursor`, open it with the pinned keys and parse it."""
    # Percent-encoded here, so the query travels exactly as signed.
    query = f"cursor={quote(cursor, safe='')}&limit={limit}"
    headers = sign_request(
        method="GET",
        path=PULL_PATH,
        query=query,
        key_id=link.device_id,
        private_key=link.enrolment.keys.signing,
        created=created_s,
    )
    _, body = open_answer(client.pull(query, headers), link, kind="pull")
    try:
        return PullPage.from_json(body)
    except ProtocolError as exc:
        detail = exc.detail if exc.code == "page.malformed" else f"{exc.code}: {exc.detail}"
        raise bad_answer(f"pull page: {detail}") from None


def pull_pages(
    store: Store,
    client: HubClient,
    link: Link,
    summary: SyncSummary,
    *,
    limit: int,
    progress: Progress | None,
    wall_ms: Callable[[], int],
    on_revoked: Callable[[HubProblem], Exception],
) -> int | None:
    """Pull and merge every page after the stored cursor; count edits in `summary`.

    Returns how far the hub holds this device's own changes (`high_water` of
    the last page; None from a hub that does not say). A cursor the hub no
    longer knows (another epoch, or one past what a restored hub holds)
    restarts the pull from the start once. Raises what the transport raises
    (what was stored stays), and `on_revoked(problem)` when the hub revoked
    the device.
    """
    position = store.sync.pull_position()
    has_restarted = False
    high_water: int | None = None
    if progress is not None:
        progress("pull", 0, None)

    def fetch(cursor: str) -> Future[PullPage]:
        now_s = wall_ms() // 1000
        return in_background("fieldreg-pull", lambda: _fetch(client, link, cursor, limit, now_s))

    next_page = fetch(position.cursor)
    while True:
        try:
            page = next_page.result()
        except HubProblem as problem:
            if problem.code == "device.revoked":
                raise on_revoked(problem) from None
            if problem.code == "cursor.invalid" and position.cursor and not has_restarted:
                # The hub no longer knows the cursor (a new epoch, or a hub that lost
                # changes): pull from the start; merging what is here changes nothing.
                named = problem.extra.get("epoch")
                epoch = named if isinstance(named, str) and named else position.epoch
                store.sync.restart_pull(epoch)
                position, has_restarted = store.sync.pull_position(), True
                next_page = fetch(position.cursor)
                continue
            raise
        if page.epoch != position.epoch and position.cursor and not has_restarted:
            store.sync.restart_pull(page.epoch)  # the cursor was from another epoch
            position, has_restarted = store.sync.pull_position(), True
            next_page = fetch(position.cursor)
            continue
        if page.more:
            if page.cursor == position.cursor and not page.edits:
                raise bad_answer("the hub says there is more but does not move the cursor")
            next_page = fetch(page.cursor)  # fetched while this page is merged
        try:
            merged = store.sync.apply_pull(
                page.edits, cursor=page.cursor, epoch=page.epoch, released=page.released
            )
        except ClockOverflow as exc:  # nothing of the page was stored
            raise bad_answer(f"pull page: an edit is stamped past any clock: {exc}") from None
        summary.received_edits += len(page.edits)
        summary.released += merged.released
        high_water = page.high_water if page.high_water is not None else high_water
        if progress is not None:
            progress("pull", summary.received_edits, None)
        if not page.more:
            return high_water
        position = PullPosition(page.cursor, page.epoch)
