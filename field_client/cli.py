"""`fieldreg`: the field worker's command line.

Exit codes: 0 done, 2 bad input or refused (nothing was written), 1 a
failure of the device (disk, database) that a person cannot fix by retyping.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.prompt import Prompt
from rich.table import Table

from field_client.enrolment import AlreadyEnrolled, CannotEnrolAgain, EnrolmentRefused, enrol_again
from field_client.enrolment import enrol as enrol_device
from field_client.forms import parse_json_records, prompt_record, validate_all
from field_client.store import (
    HistoryEntry,
    NotFound,
    Store,
    StoreExists,
    UnreadableRecord,
    display_name,
)
from field_client.sync_runner import (
    DEFAULT_MAX_BATCH_BYTES,
    NotEnrolled,
    SyncError,
    SyncSummary,
    run_sync,
)
from field_client.sync_runner import watch as watch_sync
from field_client.unlock import WeakPassphrase, WrongPassphrase
from schemas.enums import Need, Scenario
from schemas.fields import parse_field_value
from schemas.record import Registration, RegistrationCreate
from schemas.validation import InvalidRecord, validate
from sync.envelope import MAX_BODY_BYTES
from sync.transport import READ_TIMEOUT_S, HubClient, HubProblem, HubUnreachable

__all__ = ["app", "main"]

app = typer.Typer(
    name="fieldreg",
    help="Register people offline on an encrypted device store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", "-d", envvar="FIELDREG_HOME", help="Where the encrypted store lives."
    ),
]
DEFAULT_DIR = Path.home() / ".fieldreg"


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _passphrase(
    prompt: str = "Passphrase", *, env: str = "FIELDREG_PASSPHRASE", confirm: bool = False
) -> str:
    value = os.environ.get(env)
    if value:
        return value
    try:
        first = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} (again): ") != first:
            fail("the two passphrases differ")
    except (EOFError, OSError):
        fail(f"no passphrase: set {env} or run in a terminal")
    return first


@contextmanager
def opened(data_dir: Path) -> Iterator[Store]:
    try:
        store = Store.open(data_dir, _passphrase())
    except WrongPassphrase as exc:
        fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    try:
        yield store
    except InvalidRecord as exc:
        for error in exc.errors:
            err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except NotFound as exc:
        fail(str(exc.args[0]))
    except UnreadableRecord as exc:
        fail(str(exc))
    finally:
        store.close()


@app.command()
def init(
    site: Annotated[str, typer.Option(help="Site code of this device, e.g. ras-jedir.")],
    operator: Annotated[str, typer.Option(help="Default operator name for registrations.")],
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Create an encrypted store on this device."""
    passphrase = _passphrase(confirm=True)
    try:
        store = Store.init(data_dir, passphrase, site=site, operator=operator)
    except WeakPassphrase as exc:
        fail(str(exc))
    except StoreExists as exc:
        fail(str(exc))
    except InvalidRecord as exc:
        fail(str(exc))
    with store:
        out.print(
            f"Store created in {data_dir} for site [bold]{site}[/bold]; device {store.device_id}"
        )


def _progress(total: int) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=total < 50,
        transient=True,
    )


@app.command()
def register(
    json_file: Annotated[
        str | None,
        typer.Option("--json", help="A file (or - for stdin) of JSON, a JSON array or JSON Lines."),
    ] = None,
    operator: Annotated[
        str | None, typer.Option(help="Who registers (default: the store's operator).")
    ] = None,
    check_duplicates: Annotated[
        bool,
        typer.Option(
            "--check-duplicates/--no-check-duplicates",
            help="Look for earlier registrations of each person (always on in the form).",
        ),
    ] = False,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Register people: interactively, or from JSON."""
    items: list[RegistrationCreate]
    if json_file is not None:
        try:
            text = (
                sys.stdin.read()
                if json_file == "-"
                else Path(json_file).read_text(encoding="utf-8")
            )
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {json_file}: {exc}")
        try:
            items = validate_all(parse_json_records(text))
        except InvalidRecord as exc:
            for error in exc.errors:
                err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            err.print("nothing was registered", highlight=False)
            raise typer.Exit(2) from None
    elif not sys.stdin.isatty():
        fail("not a terminal: use --json FILE (or --json - for stdin)")
    with opened(data_dir) as store:
        if json_file is None:
            raw = prompt_record(
                lambda q, d: Prompt.ask(q, default=d, console=out),
                operator=operator or store.operator,
            )
            items = [_review_duplicates(store, validate(RegistrationCreate, raw), ask=True)]
        elif check_duplicates:
            items = [_review_duplicates(store, item, ask=False) for item in items]
            flagged = sum(1 for item in items if item.duplicate_review is not None)
            if flagged:
                out.print(
                    f"{flagged} possibly already registered: registered anyway, decision recorded"
                )
        with _progress(len(items)) as bar:
            task = bar.add_task("registering", total=len(items))
            saved = store.register(
                items, operator=operator, progress=lambda n: bar.advance(task, n)
            )
        if len(saved) == 1:
            out.print(
                f"registered {saved[0].id} ({display_name(saved[0].model_dump(mode='json'))})"
            )
        else:
            out.print(f"registered {len(saved)} people")


def _review_duplicates(store: Store, item: RegistrationCreate, *, ask: bool) -> RegistrationCreate:
    """Show possible earlier registrations and record the field worker's decision."""
    found = store.possible_duplicates(item)
    if not found:
        return item
    candidates = [d.id for d in found]
    review: dict[str, Any] = {"candidates": candidates, "best_score": found[0].score}
    if not ask:
        return item.model_copy(
            update={"duplicate_review": {**review, "decision": "registered_anyway"}}
        )
    table = Table("#", "id", "name", "site", "registered", "score", "why")
    for number, dup in enumerate(found, start=1):
        table.add_row(
            str(number), dup.id, dup.name, dup.site, dup.registered_at, f"{dup.score:.2f}", dup.why
        )
    out.print("[bold]Possibly already registered:[/bold]")
    out.print(table)
    choices = ["r", "c", *[str(n) for n in range(1, len(found) + 1)]]
    answer = Prompt.ask(
        "Register anyway (r), link to one of them (its #), or cancel (c)",
        choices=choices,
        default="r",
        console=out,
    )
    if answer == "c":
        fail("cancelled: nothing was registered", code=2)
    if answer == "r":
        decision = {**review, "decision": "registered_anyway"}
    else:
        decision = {**review, "decision": "linked", "linked_to": found[int(answer) - 1].id}
    return RegistrationCreate.model_validate(
        {**item.model_dump(mode="json", exclude_none=True), "duplicate_review": decision}
    )


@app.command("list")
def list_(
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    scenario: Annotated[Scenario | None, typer.Option(help="Only this crisis scenario.")] = None,
    need: Annotated[Need | None, typer.Option(help="Only people with this need.")] = None,
    registered_from: Annotated[
        str | None, typer.Option("--from", help="Registered on or after (YYYY-MM-DD).")
    ] = None,
    registered_to: Annotated[
        str | None, typer.Option("--to", help="Registered on or before (YYYY-MM-DD).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines instead of a table.")] = False,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """List registered people, most recent first."""
    bounds: list[date | None] = []
    for name, value in (("--from", registered_from), ("--to", registered_to)):
        try:
            bounds.append(date.fromisoformat(value) if value else None)
        except ValueError:
            fail(f"{name}: {value!r} is not a date (YYYY-MM-DD)")
    with opened(data_dir) as store:
        rows = store.list_records(
            site=site,
            scenario=scenario.value if scenario else None,
            need=need.value if need else None,
            registered_from=bounds[0],
            registered_to=bounds[1],
            limit=limit,
        )
    if as_json:
        for row in rows:
            out.print_json(json.dumps(row.__dict__), indent=None)
        return
    table = Table("id", "name", "site", "scenario", "registered")
    for row in rows:
        table.add_row(row.id, row.name, row.site, row.scenario or "", row.registered_at[:16])
    out.print(table)
    out.print(f"{len(rows)} shown")


@app.command()
def show(
    record_id: Annotated[
        str, typer.Argument(metavar="ID", help="Record id or its first 8+ characters.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="The record as JSON.")] = False,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Show one record with the history of every field."""
    with opened(data_dir) as store:
        record = store.get(record_id)
        other = store.other_fields(str(record.id))
        history = store.history(str(record.id))
    if as_json:
        doc = record.model_dump(mode="json")
        out.print_json(json.dumps({**doc, "other_fields": other} if other else doc))
        return
    out.print(f"[bold]{display_name(record.model_dump(mode='json'))}[/bold]  {record.id}")
    out.print(_history_table([e for e in history if e.field not in other]))
    if other:
        # Fields this version does not know (an older version's retired field,
        # a newer one's): kept as received, synced, not editable here.
        out.print("[bold]Other fields (another schema version, kept as received)[/bold]")
        out.print(_history_table([e for e in history if e.field in other]))


def _history_table(entries: list[HistoryEntry]) -> Table:
    table = Table("field", "value", "when (HLC)", "device", "operator", "")
    for entry in entries:
        value = json.dumps(entry.value, ensure_ascii=False)
        table.add_row(
            # Values are people's text (or kept as received): never read as markup.
            escape(entry.field),
            escape(value if len(value) < 60 else value[:57] + "..."),
            entry.stamp.isoformat(),
            escape(entry.device_id[-8:]),
            escape(entry.operator),
            "current" if entry.is_current else "",
        )
    return table


@app.command()
def edit(
    record_id: Annotated[
        str, typer.Argument(metavar="ID", help="Record id or its first 8+ characters.")
    ],
    assignments: Annotated[
        list[str], typer.Option("--set", help="field=value, e.g. situation.needs=food,shelter")
    ],
    operator: Annotated[
        str | None, typer.Option(help="Who edits (default: the store's operator).")
    ] = None,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Change fields of a record (each change is kept in its history)."""
    values: dict[str, Any] = {}
    for item in assignments:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            fail(f"--set {item!r}: expected field=value")
        try:
            values[path.strip()] = parse_field_value(path.strip(), text)
        except ValueError as exc:
            fail(f"{path}: {exc}")
    with opened(data_dir) as store:
        record: Registration = store.edit(record_id, values, operator=operator)
    out.print(f"updated {record.id}")


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="A name in any script or spelling.")],
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Find people by name, across spellings and scripts; best matches first."""
    if not text.strip():
        fail("search text is empty")
    with opened(data_dir) as store:
        hits = store.search(text, limit=limit)
    table = Table("score", "id", "name", "site")
    for hit in hits:
        table.add_row(f"{hit.score:.0f}", hit.id, hit.name, hit.site)
    out.print(table)
    out.print(f"{len(hits)} found")


@app.command()
def status(data_dir: DataDir = DEFAULT_DIR) -> None:
    """Counts of records and changes, and what waits to be sent."""
    with opened(data_dir) as store:
        st = store.status()
    out.print(f"device     {st.device_id}")
    out.print(f"site       {st.site}")
    out.print(f"records    {st.records} ({st.own_records} registered here)")
    out.print(f"changes    {st.changes}")
    out.print(f"outbox     {st.pending_outbox} change(s) not yet sent")
    out.print(f"clock      {st.last_stamp.isoformat()}")
    link = st.sync
    if not link.is_enrolled:
        out.print("hub        not enrolled (fieldreg enrol --hub URL --code CODE)")
        return
    out.print(f"hub        {link.hub_url}", highlight=False)
    out.print(f"hub key    {link.hub_fingerprint}", highlight=False)
    out.print(f"sites      {', '.join(link.sites)}")
    out.print(f"pushed     {link.pushed_seq} of {link.last_seq} change(s) confirmed by the hub")
    last = "never"
    if link.last_sync_at_ms is not None:
        when = datetime.fromtimestamp(link.last_sync_at_ms / 1000, UTC)
        last = when.strftime("%Y-%m-%d %H:%M UTC")
    out.print(f"last sync  {last}")
    out.print(f"lost       {link.lost_edits} of your changes lost or in conflict at the hub")
    if link.quarantined:
        out.print(f"quarantine {link.quarantined} of your changes held by the hub for review")
    if link.is_revoked:
        out.print("[red]REVOKED[/red]    the hub ordered this device wiped: see your coordinator")


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


@app.command()
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


@app.command()
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


@app.command()
def schema() -> None:
    """Print the JSON Schema of a registration record."""
    out.print_json(json.dumps(Registration.model_json_schema()))


@app.command()
def passphrase(data_dir: DataDir = DEFAULT_DIR) -> None:
    """Change the passphrase (and re-encrypt the store under a new key)."""
    old = _passphrase("Current passphrase")
    new = _passphrase("New passphrase", env="FIELDREG_NEW_PASSPHRASE", confirm=True)
    try:
        with Store.open(data_dir, old) as store:
            store.change_passphrase(old, new)
    except (WrongPassphrase, WeakPassphrase, FileNotFoundError) as exc:
        fail(str(exc))
    out.print("passphrase changed; the store is re-encrypted under a new key")


def main() -> None:
    app()
