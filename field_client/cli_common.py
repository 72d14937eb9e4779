"""What every `fieldreg` command shares: the Typer app, the consoles, the
`--data-dir` option, the passphrase prompt and opening the store with one-line
errors (exit code 2) instead of tracebacks.

A command that opens or makes a store itself (`init`, `passphrase`) gets the
same one line for a store that cannot be used (`STORE_UNUSABLE`) from the
app: no traceback even where the command does not catch it."""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from field_client.db import DatabaseLocked, MissingDatabase, NewerStore
from field_client.store import Store
from field_client.store_files import NoStore, UnfinishedStore, UnusableDataDir
from field_client.store_reads import NotFound, UnreadableRecord
from field_client.unlock import DamagedKeyFile, WrongPassphrase
from schemas.validation import InvalidRecord

__all__ = [
    "DEFAULT_DIR",
    "STORE_UNUSABLE",
    "DataDir",
    "app",
    "err",
    "fail",
    "opened",
    "out",
    "passphrase_of",
    "print_error",
]

# A store that cannot be made or opened as it is: what is wrong is in the message.
STORE_UNUSABLE = (
    DamagedKeyFile,
    DatabaseLocked,
    MissingDatabase,
    NewerStore,
    NoStore,
    UnfinishedStore,
    UnusableDataDir,
    WrongPassphrase,
)


class _Commands(TyperGroup):
    """The commands, reporting `STORE_UNUSABLE` in one line (exit 2)."""

    def invoke(self, ctx: Any) -> Any:  # typer's own vendored click.Context
        try:
            return super().invoke(ctx)
        except STORE_UNUSABLE as exc:
            fail(str(exc))


app = typer.Typer(
    name="fieldreg",
    help="Register people offline on an encrypted device store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)
# What is printed holds people's names and answers, paths and a hub's words:
# none of it is read as Rich markup ("[/b]" would be an error, "[red]" would
# vanish) or emoji codes (":flag_ly:"). Styles are given as `style=` or `Text`.
out = Console(markup=False, emoji=False)
err = Console(stderr=True, markup=False, emoji=False)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", "-d", envvar="FIELDREG_HOME", help="Where the encrypted store lives."
    ),
]
DEFAULT_DIR = Path.home() / ".fieldreg"


def print_error(message: str) -> None:
    """One `error: ...` line on stderr, the message printed as it is."""
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def passphrase_of(
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
        Store.check_present(data_dir)  # before asking for a passphrase
        store = Store.open(data_dir, passphrase_of())
    except (FileNotFoundError, ValueError, DatabaseLocked) as exc:
        fail(str(exc))
    try:
        yield store
    except InvalidRecord as exc:
        for error in exc.errors:
            print_error(str(error))
        raise typer.Exit(2) from None
    except NotFound as exc:
        fail(str(exc.args[0]))
    except UnreadableRecord as exc:
        fail(str(exc))
    finally:
        store.close()
