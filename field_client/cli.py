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
from datetime import date
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.prompt import Prompt
from rich.table import Table

from field_client.forms import parse_json_records, prompt_record, validate_all
from field_client.store import NotFound, Store, StoreExists, display_name
from field_client.unlock import WeakPassphrase, WrongPassphrase
from schemas.enums import Need, Scenario
from schemas.fields import parse_field_value
from schemas.record import Registration, RegistrationCreate
from schemas.validation import InvalidRecord, validate

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
            items = [validate(RegistrationCreate, raw)]
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
        history = store.history(str(record.id))
    if as_json:
        out.print_json(record.model_dump_json())
        return
    out.print(f"[bold]{display_name(record.model_dump(mode='json'))}[/bold]  {record.id}")
    table = Table("field", "value", "when (HLC)", "device", "operator", "")
    for entry in history:
        value = json.dumps(entry.value, ensure_ascii=False)
        table.add_row(
            entry.field,
            value if len(value) < 60 else value[:57] + "...",
            entry.stamp.isoformat(),
            entry.device_id[-8:],
            entry.operator,
            "current" if entry.is_current else "",
        )
    out.print(table)


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
