"""`fieldreg-hub dedup-file INPUT --out PAIRS.csv`: duplicate pairs in a file, no hub needed.

`register(app)` adds the command to the hub's CLI (`server.cli` calls it). The
file logic is in `server.dedup_file`; this module parses the options, shows
progress on stderr and turns bad input into one line and exit code 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from schemas.matching import OPERATING_THRESHOLD
from server.dedup_file import InputError, Pair, Parsed, find_pairs, parse, write_pairs

__all__ = ["PROGRESS_FROM_RECORDS", "dedup_file", "register"]

PROGRESS_FROM_RECORDS = 2_000
"""Inputs at least this long get a progress bar on stderr (when it is a terminal)."""
_SHOWN_BAD_LINES = 20

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the `dedup-file` command to `app`."""
    app.command("dedup-file")(dedup_file)


def _fail(message: str, code: int = 2) -> NoReturn:
    _err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _threshold(text: str | None) -> float:
    if text is None:
        return OPERATING_THRESHOLD
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        _fail(f"--threshold {text!r}: use a number from 0 to 1, e.g. {OPERATING_THRESHOLD}")
    return value


def _read(source: str) -> str:
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        _fail(f"cannot read {source}: {exc.strerror or exc}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"{source} is not UTF-8 text (byte {exc.start})")


def _write(pairs: list[Pair], out: str) -> None:
    if out == "-":
        write_pairs(pairs, sys.stdout)
        return
    target = Path(out)
    temporary = None
    try:  # write beside the target, then rename: never a half-written PAIRS.csv
        handle, temporary = tempfile.mkstemp(prefix=".dedup-", suffix=".csv", dir=target.parent)
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            write_pairs(pairs, stream)
        os.replace(temporary, target)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        _fail(f"cannot write {out}: {exc.strerror or exc}")


def _pairs(parsed: Parsed, threshold: float) -> list[Pair]:
    total = len(parsed.records)
    if total < PROGRESS_FROM_RECORDS or not _err.is_terminal:
        return find_pairs(parsed.records, threshold=threshold)
    columns = ("scoring", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_err, transient=True) as progress:
        task = progress.add_task("scoring", total=total)
        return find_pairs(
            parsed.records, threshold=threshold, progress=lambda n: progress.advance(task, n)
        )


def dedup_file(
    input_file: Annotated[
        str,
        typer.Argument(metavar="INPUT", help="JSON Lines or CSV of registrations; - for stdin."),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Where to write id_1,id_2,score CSV; - for stdout.")
    ],
    threshold: Annotated[
        str | None,
        typer.Option(help=f"Lowest score written, 0..1 (default {OPERATING_THRESHOLD})."),
    ] = None,
    input_format: Annotated[
        str, typer.Option("--format", help="auto (by extension, then content), json or csv.")
    ] = "auto",
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail (exit 2) if any input line is unreadable.")
    ] = False,
) -> None:
    """Find likely duplicate registrations in a file, without a hub or its database.

    Unreadable lines are reported by line number and skipped; exit code 2 when
    the file cannot be read or no readable record is left.
    """
    limit = _threshold(threshold)
    if input_format not in ("auto", "json", "csv"):
        _fail(f"--format {input_format!r}: use auto, json or csv")
    text = _read(input_file)
    try:
        parsed = parse(text, fmt=input_format, name=input_file)
    except InputError as exc:
        _fail(f"{input_file}: {exc}")
    for bad in parsed.bad[:_SHOWN_BAD_LINES]:
        _err.print(f"[yellow]skipped[/yellow] {bad}")
    if len(parsed.bad) > _SHOWN_BAD_LINES:
        _err.print(f"[yellow]skipped[/yellow] {len(parsed.bad) - _SHOWN_BAD_LINES} more lines")
    if parsed.bad and strict:
        _fail(f"{len(parsed.bad)} unreadable line(s) and --strict: nothing written")
    if not parsed.records:
        _fail(f"{input_file}: no readable record")
    pairs = _pairs(parsed, limit)
    _write(pairs, out)
    where = "stdout" if out == "-" else out
    _err.print(
        f"{len(parsed.records):,} records, {len(parsed.bad):,} skipped; "
        f"{len(pairs):,} pairs at or above {limit} written to {where}"
    )
