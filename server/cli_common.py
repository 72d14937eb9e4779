"""What every `fieldreg-hub` command module shares: the consoles, the
`--data-dir` option, opening the hub, failing with one line, request ids.

`server.cli` builds the app; command groups in their own modules
(`audit_commands`, `dedup_commands`, `restore_commands`) register on it and
import these instead of keeping copies.

Text from the hub or the operator (names, ids, reasons, paths) may hold
anything, `[/b]` included: the consoles read no Rich markup (nor emoji codes),
so it is printed as it is; styles are given as `Text` or `style=`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from server.hub import Hub
from server.keystore import KEYS_FILE
from server.settings import DEFAULT_DATABASE, HubSettings

__all__ = [
    "DataDir",
    "audit_cli",
    "cli_request_id",
    "database_reason",
    "err",
    "fail",
    "file_reason",
    "is_text",
    "open_hub",
    "out",
    "password_from",
    "settings_for",
    "table_of",
]

out = Console(markup=False, emoji=False)  # "[/b]" and ":flag_sy:" stay as they are
err = Console(stderr=True, markup=False, emoji=False)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", envvar="FIELDREG_HUB_DATA_DIR", help="Hub keys, master key, SQLite file."
    ),
]


def table_of(key: str, *headers: str) -> Table:
    """A table whose first column (`key`: device ids, record ids, user names,
    which other commands take) is never wrapped nor cut, whatever the width,
    and whose other cells fold onto more lines instead of ending in "…"."""
    columns = [Column(key, no_wrap=True, overflow="fold")]
    columns += [Column(header, overflow="fold") for header in headers]
    return Table(*columns)


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and exit `code` (2: the command cannot do it).

    `message` is plain text, shown as it is: never read as markup."""
    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def file_reason(exc: OSError) -> str:
    """Which file and why, from an error of the file system."""
    if exc.filename is None:
        return str(exc)
    reason = f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, FileExistsError) and Path(exc.filename).is_file():
        reason = f"{exc.filename} is a file, not a directory"
    if isinstance(exc, NotADirectoryError):
        blocker = next((p for p in Path(exc.filename).parents if p.is_file()), None)
        if blocker is not None:
            reason += f" ({blocker} is a file)"
    return reason


def database_reason(exc: sa.exc.DBAPIError) -> str:
    """The database's own first line about `exc`: never the statement or its parameters."""
    if exc.orig is None:
        return type(exc).__name__
    return (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]


def is_text(value: str) -> bool:
    """Whether `value` is Unicode text: not bytes that were not UTF-8, which
    Python hands over as lone surrogates (`\\udcff`) no database or hash takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def password_from(variable: str) -> str | None:
    """The password in environment `variable`, None when unset or empty."""
    value = os.environ.get(variable) or None
    if value is not None and not is_text(value):
        fail(f"{variable} is not UTF-8 text")
    return value


def settings_for(data_dir: Path | None) -> HubSettings:
    settings = HubSettings()
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    return settings


def open_hub(data_dir: Path | None) -> Hub:
    """The hub in `data_dir`, or one line saying why it cannot be opened: not
    initialised, a key file unreadable (which one, why) or damaged, its SQLite
    database missing (never made anew, empty, beside the keys)."""
    try:
        settings = settings_for(data_dir)
    except ValueError as exc:  # a FIELDREG_HUB_* variable out of range
        fail(str(exc))
    database = settings.data_dir / DEFAULT_DATABASE
    keys = settings.data_dir / KEYS_FILE
    if settings.database_url is None and keys.is_file() and not database.exists():
        fail(
            f"the hub's database {database} is missing: put its backup back in place"
            " (docs/deployment.md, Restoring), or set FIELDREG_HUB_DATABASE_URL"
        )
    try:
        return Hub(settings)
    except FileNotFoundError as exc:
        fail(file_reason(exc))
    except OSError as exc:  # PermissionError, IsADirectoryError, NotADirectoryError
        fail(f"cannot read the hub's keys: {file_reason(exc)}")
    except (RuntimeError, ValueError) as exc:
        fail(str(exc))


def cli_request_id() -> str:
    """The request id audit entries of one CLI run carry."""
    return f"cli-{uuid.uuid4().hex[:12]}"


def audit_cli(
    hub: Hub,
    conn: sa.Connection,
    action: str,
    target: str,
    *,
    actor: str = "cli:hub",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Audit what a command on the hub machine did, in the caller's transaction."""
    hub.audit(
        conn, actor=actor, action=action, target=target, request_id=cli_request_id(), detail=detail
    )
