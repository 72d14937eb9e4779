"""`fieldreg enrol` and `fieldreg sync`: the commands that talk to a hub.

`register(app)` adds them to the field CLI (`field_client.cli` calls it). The
work is in `field_client.enrolment` and `field_client.sync_runner`; this
module checks the options, shows progress on stderr and turns a refusal, a
hub failing (5xx) or an unreachable hub into one line and exit code 2.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from field_client.cli_common import DEFAULT_DIR, DataDir, err, fail, opened, out
from field_client.enrolment import AlreadyEnrolled, CannotEnrolAgain, EnrolmentRefused, enrol_again
from field_client.enrolment import enrol as enrol_device
from field_client.sync_runner import (
    DEFAULT_MAX_BATCH_BYTES,
    NotEnrolled,
    SyncError,
    SyncSummary,
    run_sync,
)
from field_client.sync_runner import watch as watch_sync
from sync.envelope import MAX_BODY_BYTES
from sync.transport import READ_TIMEOUT_S, HubClient, HubProblem, HubUnreachable

__all__ = ["enrol", "register", "sync"]


def register(app: typer.Typer) -> None:
    """Add `enrol` and `sync` to `app`."""
    app.command()(enrol)
    app.command()(sync)


def _hub_url(text: str) -> str:
    try:
        url = httpx.URL(text.strip())
    except httpx.InvalidURL as exc:
        fail(f"--hub: {text!r} is not a URL ({exc})")
    if url.scheme not in ("http", "https") or not url.host:
        fail(f"--hub: {text!r} is not an http:// or https:// URL")
    return str(url).rstrip("/")


def _hub_failure(exc: Exception, url: str, *, is_stored: bool) -> NoReturn:
    """One line for the operator; never a traceback."""
    if isinstance(exc, HubUnreachable):
        tail = "nothing lost, run again" if is_stored else "nothing was stored, run again"
        fail(f"hub unreachable at {url}: {exc.detail}; {tail}")
    if isinstance(exc, HubProblem) and exc.status >= 500:
        tail = "nothing lost, run again later" if is_stored else "nothing was stored, run again"
        fail(f"the hub failed (HTTP {exc.status}, {exc.code}): {exc.detail}; {tail}")
    if isinstance(exc, HubProblem):
        hint = {
            "request.too_large": "; try a smaller --max-batch-bytes",
            "device.unknown": "; if the hub was restored from an older backup, ask its operator"
            " for an enrolment code and run fieldreg enrol --again --code CODE",
        }.get(exc.code, "")
        fail(f"the hub refused ({exc.code}): {exc.detail}{hint}")
    if isinstance(exc, SyncError):
        fail(f"{exc.detail} ({exc.code})")
    fail(str(exc))


def enrol(
    code: Annotated[str, typer.Option(help="The one-time enrolment code from the hub operator.")],
    hub: Annotated[
        str | None,
        typer.Option("--hub", help="The hub's URL, e.g. https://hub.example.org"),
    ] = None,
    expect_fingerprint: Annotated[
        str | None,
        typer.Option(help="The hub key fingerprint the hub operator read out; refuse any other."),
    ] = None,
    again: Annotated[
        bool,
        typer.Option(
            "--again",
            help="Enrol this store again with the hub it is pinned to, keeping its keys"
            " (after the hub was restored from a backup older than this device).",
        ),
    ] = False,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Enrol this device with a hub: make its keys, pin the hub's keys."""
    if not code.strip():
        fail("--code is empty")
    if hub is None and not again:
        fail("--hub is needed (the hub's URL)")
    if hub is not None and again:
        fail("--again enrols with the hub URL pinned at enrolment; leave out --hub")
    if again and expect_fingerprint is not None:
        fail("--again checks the hub against the fingerprint pinned at enrolment")
    with opened(data_dir) as store:
        pinned = store.sync.read_enrolment()
        if again and pinned is None:
            fail("this store was never enrolled: use fieldreg enrol --hub URL --code CODE")
        url = pinned.hub_url if again and pinned else _hub_url(hub or "")
        with httpx.Client(base_url=url) as http:
            client = HubClient(http)
            try:
                if again:
                    result = enrol_again(store, client, code=code.strip())
                else:
                    result = enrol_device(
                        store, client, code=code.strip(), expect_fingerprint=expect_fingerprint
                    )
            except (AlreadyEnrolled, CannotEnrolAgain, EnrolmentRefused) as exc:
                again_hint = "; after a hub restore: fieldreg enrol --again --code CODE"
                fail(f"{exc}{again_hint if isinstance(exc, AlreadyEnrolled) else ''}")
            except (HubUnreachable, HubProblem) as exc:
                if isinstance(exc, HubProblem) and exc.code == "device.exists" and again:
                    fail("the hub still knows this device: nothing to do, run fieldreg sync")
                _hub_failure(exc, url, is_stored=False)
    out.print(f"enrolled {'again ' if again else ''}with {url}", highlight=False)
    out.print(f"hub fingerprint  {result.hub_fingerprint}", highlight=False)
    out.print(f"sites            {', '.join(result.sites)}")
    if again:
        out.print("run fieldreg sync: the hub gets again what it lost from this device")
    else:
        out.print("compare the fingerprint with the one the hub operator reads out")


def _summary_line(summary: SyncSummary) -> str:
    s = summary
    line = (
        f"sent {s.sent_changes} changes in {s.sent_batches} batches,"
        f" acknowledged {s.acknowledged} ({s.duplicates} duplicates),"
        f" received {s.received_edits}, conflicts {s.conflicts},"
        f" your edits that lost: {s.superseded}"
    )
    if s.quarantined:
        line += f"; quarantined by the hub: {s.quarantined}"
    if s.released:
        line += f"; held by the hub before, now applied: {s.released}"
    return line


class _SyncBar:
    """A rich progress bar on stderr, one task per phase (push, pull)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if phase not in self._tasks:
            label = "pushing" if phase == "push" else "pulling"
            self._tasks[phase] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)


def sync(
    hub_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            help="Seconds to wait for each answer of the hub, plus the time a big push"
            " takes to upload at 64 kbit/s.",
        ),
    ] = READ_TIMEOUT_S,
    max_batch_bytes: Annotated[
        int, typer.Option(min=1024, max=MAX_BODY_BYTES, help="Size of a batch before compression.")
    ] = DEFAULT_MAX_BATCH_BYTES,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep syncing (backing off when idle) until Ctrl-C.")
    ] = False,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Send what waits in the outbox to the hub, then receive what others changed."""
    with opened(data_dir) as store:
        enrolment = store.sync.read_enrolment()
        if enrolment is None:
            fail(NotEnrolled().detail)
        url = enrolment.hub_url
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            transient=True,
        )

        def report(result: SyncSummary | Exception) -> None:
            # --watch: a line for each run that moved something, and each failure.
            if isinstance(result, SyncSummary):
                if result.has_moved:
                    out.print(_summary_line(result), highlight=False)
            elif isinstance(result, HubUnreachable):
                err.print(f"hub unreachable at {url}: {result.detail}; retrying", highlight=False)
            else:
                err.print(f"the hub failed ({result}); retrying", highlight=False)

        with httpx.Client(base_url=url) as http, progress:
            client = HubClient(http, read_timeout_s=hub_timeout)
            bar = _SyncBar(progress)
            try:
                if watch:
                    summary = watch_sync(
                        store, client, max_batch_bytes=max_batch_bytes, progress=bar, on_run=report
                    )
                else:
                    summary = run_sync(store, client, max_batch_bytes=max_batch_bytes, progress=bar)
            except (HubUnreachable, HubProblem, SyncError) as exc:
                progress.stop()
                _hub_failure(exc, url, is_stored=True)
    if watch:
        out.print(f"stopped; in total: {_summary_line(summary)}", highlight=False)
    else:
        out.print(_summary_line(summary), highlight=False)
