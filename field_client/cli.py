"""`fieldreg`: the field worker's command line.

Exit codes: 0 done; 2 bad input or refused (nothing was written), or for
`enrol` and `sync` a hub that refused, failed or could not be reached (what
the hub acknowledged before that is kept); 1 a failure of the device (disk,
database, a store busy past its timeout) that a person cannot fix by retyping.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.prompt import Prompt
from rich.table import Table
from rich.text import Text

from field_client import db, hub_commands
from field_client.cli_common import (
    DEFAULT_DIR,
    DataDir,
    app,
    err,
    fail,
    opened,
    out,
    passphrase_of,
    print_error,
)
from field_client.duplicate_review import CANDIDATES_SHOWN, review_all, with_changes
from field_client.forms import parse_json_records, prompt_record, validate_all
from field_client.store import Store, operator_name
from field_client.store_files import StoreBusy, StoreExists
from field_client.store_reads import HistoryEntry, display_name
from field_client.unlock import WeakPassphrase, WrongPassphrase
from schemas.enums import Need, Scenario
from schemas.fields import parse_field_value
from schemas.record import Registration, RegistrationCreate
from schemas.validation import InvalidRecord, validate

__all__ = ["app", "main"]

LIST_MAX = 1_000_000

# Rich's prompt writes its own messages ("Please select one of the available
# options") as markup, so it gets a console that reads markup; the questions
# are given to it as `Text`, so nothing typed or stored is read as markup.
_asking = Console(emoji=False)


def _ask(question: str, default: str, choices: list[str] | None = None) -> str:
    return Prompt.ask(Text(question), default=default, choices=choices, console=_asking)


@app.command()
def init(
    site: Annotated[str, typer.Option(help="Site code of this device, e.g. ras-jedir.")],
    operator: Annotated[str, typer.Option(help="Default operator name for registrations.")],
    data_dir: DataDir = DEFAULT_DIR,
) -> None:
    """Create an encrypted store on this device."""
    passphrase = passphrase_of(confirm=True)
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
            Text.assemble(
                f"Store created in {data_dir} for site ",
                (site, "bold"),
                f"; device {store.device_id}",
            )
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
    operator = _checked_operator(operator)
    items: list[RegistrationCreate]
    if json_file is not None:
        try:
            # utf-8-sig: Windows Notepad starts UTF-8 with a byte-order mark.
            raw = sys.stdin.buffer.read() if json_file == "-" else Path(json_file).read_bytes()
            text = raw.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {json_file}: {exc}")
        try:
            items = validate_all(parse_json_records(text))
        except InvalidRecord as exc:
            for error in exc.errors:
                print_error(str(error))
            err.print("nothing was registered", highlight=False)
            raise typer.Exit(2) from None
    elif not sys.stdin.isatty():
        fail("not a terminal: use --json FILE (or --json - for stdin)")
    with opened(data_dir) as store:
        # Before any question: the store's own operator may be one the hub refuses.
        operator = operator_name(store.operator if operator is None else operator)
        if json_file is None:
            raw = prompt_record(
                _ask,
                operator=operator,
                say=lambda m: out.print(m, style="red", highlight=False, soft_wrap=True),
            )
            items = [_review_duplicates(store, validate(RegistrationCreate, raw))]
        elif check_duplicates:
            items = review_all(store, items)
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


def _checked_operator(operator: str | None) -> str | None:
    """`--operator` trimmed, or a one-line error (exit 2) if the hub would refuse it."""
    if operator is None:
        return None
    try:
        return operator_name(operator)
    except InvalidRecord as exc:
        fail(f"--operator: {exc.errors[0].reason}")


def _review_duplicates(store: Store, item: RegistrationCreate) -> RegistrationCreate:
    """Show possible earlier registrations and record the field worker's decision."""
    found = store.possible_duplicates(item, limit=CANDIDATES_SHOWN)
    if not found:
        return item
    candidates = [d.id for d in found]
    review: dict[str, Any] = {"candidates": candidates, "best_score": found[0].score}
    table = Table("#", "id", "name", "site", "registered", "score", "why")
    for number, dup in enumerate(found, start=1):
        table.add_row(
            str(number), dup.id, dup.name, dup.site, dup.registered_at, f"{dup.score:.2f}", dup.why
        )
    out.print("Possibly already registered:", style="bold")
    out.print(table)
    choices = ["r", "c", *[str(n) for n in range(1, len(found) + 1)]]
    answer = _ask("Register anyway (r), link to one of them (its #), or cancel (c)", "r", choices)
    if answer == "c":
        fail("cancelled: nothing was registered", code=2)
    if answer == "r":
        decision = {**review, "decision": "registered_anyway"}
    else:
        decision = {**review, "decision": "linked", "linked_to": found[int(answer) - 1].id}
    return with_changes(item, duplicate_review=decision)


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
    # Bounded: SQLite takes a limit of at most 2**63 - 1, anything above was a traceback.
    limit: Annotated[int, typer.Option(min=1, max=LIST_MAX, help="At most this many.")] = 100,
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
    out.print(
        Text.assemble((display_name(record.model_dump(mode="json")), "bold"), f"  {record.id}")
    )
    out.print(_history_table([e for e in history if e.field not in other]))
    if other:
        # Fields this version does not know (an older version's retired field,
        # a newer one's): kept as received, synced, not editable here.
        out.print("Other fields (another schema version, kept as received)", style="bold")
        out.print(_history_table([e for e in history if e.field in other]))


def _history_table(entries: list[HistoryEntry]) -> Table:
    table = Table("field", "value", "when (HLC)", "device", "operator", "")
    for entry in entries:
        value = json.dumps(entry.value, ensure_ascii=False)
        table.add_row(
            entry.field,
            value if len(value) < 60 else value[:57] + "...",
            entry.stamp.isoformat(),
            entry.device_id[-8:],
            entry.operator,
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
    operator = _checked_operator(operator)
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
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many.")] = 20,
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
        out.print(
            Text.assemble(
                ("REVOKED", "red"), "    the hub ordered this device wiped: see your coordinator"
            )
        )


hub_commands.register(app)  # enrol, sync: after status in --help, as before


@app.command()
def schema() -> None:
    """Print the JSON Schema of a registration record."""
    out.print_json(json.dumps(Registration.model_json_schema()))


@app.command()
def passphrase(data_dir: DataDir = DEFAULT_DIR) -> None:
    """Change the passphrase (and re-encrypt the store under a new key)."""
    Store.check_present(data_dir)  # before asking for passphrases (the app reports NoStore)
    old = passphrase_of("Current passphrase")
    new = passphrase_of("New passphrase", env="FIELDREG_NEW_PASSPHRASE", confirm=True)
    try:
        with Store.open(data_dir, old) as store:
            store.change_passphrase(old, new)
    except (WrongPassphrase, WeakPassphrase, FileNotFoundError) as exc:
        fail(str(exc))
    except StoreBusy as exc:
        fail(str(exc), code=1)  # busy, as any store past its timeout: run it again
    out.print("passphrase changed; the store is re-encrypted under a new key")


def main() -> None:
    try:
        app()
    except (sa.exc.DBAPIError, db.DriverError) as exc:
        # One line, never a traceback: SQLAlchemy's message would show the
        # statement's parameters, a person's names and documents among them.
        print_error(_database_failure(exc))
        raise SystemExit(1) from None


def _database_failure(exc: Exception) -> str:
    """The line for a database error: the driver's reason, never the statement."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    reason = (str(orig).splitlines() or [type(orig).__name__])[0]
    if isinstance(orig, db.DriverOperationalError):
        # The store stayed locked past its busy timeout (another fieldreg
        # command writing, a sync in another window) or the disk failed.
        # The transaction that failed wrote nothing.
        return (
            f"the store did not answer ({reason}); is another fieldreg"
            " command using it? Nothing was lost: run the command again"
        )
    # SQLCipher checks every page it reads: one that fails is damaged on disk.
    return f"the store is damaged ({reason}): restore it from a backup"
