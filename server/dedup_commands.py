"""`fieldreg-hub dedup list | scan` (the hub's duplicate queue) and
`fieldreg-hub dedup-file INPUT --out PAIRS.csv` (duplicate pairs in a file, no
hub needed).

`register(app)` adds them to the hub's CLI (`server.cli` calls it). The file
logic is in `server.dedup_file`, the queue's in `server.duplicates` and
`server.dedup_check` and `server.dedup_scan`; this module parses the options, shows progress on
stderr and turns bad input into one line and exit code 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from schemas.matching import OPERATING_THRESHOLD
from server import admin, dedup_check, duplicates
from server.cli_common import DataDir, audit_cli, err, fail, open_hub, out
from server.dedup_file import InputError, Pair, Parsed, find_pairs, parse, write_pairs
from server.dedup_scan import ScanStopped, scan

__all__ = ["PROGRESS_FROM_RECORDS", "dedup_app", "dedup_file", "register"]

PROGRESS_FROM_RECORDS = 2_000
"""Inputs at least this long get a progress bar on stderr (when it is a terminal)."""
_SHOWN_BAD_LINES = 20


dedup_app = typer.Typer(help="The duplicate queue.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the `dedup` group (list, scan) and the `dedup-file` command to `app`."""
    app.add_typer(dedup_app, name="dedup")
    app.command("dedup-file")(dedup_file)


@dedup_app.command("list")
def dedup_list(
    data_dir: DataDir = None,
    status: Annotated[str, typer.Option(help="open, merged, rejected or unmerged")] = "open",
) -> None:
    """Possible duplicates with the names and why (identifying: audited)."""
    if status not in ("open", "merged", "rejected", "unmerged"):
        fail(f"--status {status!r}: choose open, merged, rejected or unmerged")
    hub = open_hub(data_dir)
    hub.checker.check_all_pending()  # records pushed moments ago are checked first
    with hub.engine.begin() as conn:
        pairs = duplicates.list_pairs(conn, sites=None, status=status, limit=1000, offset=0)
        views = [
            duplicates.get_pair(
                conn, p.id, sites=None, master_key=hub.secrets.master_key, index=hub.block_index
            )
            for p in pairs
        ]
        names = admin.names_of(
            conn, hub.secrets.master_key, {i for v in views for i in (v.record_a, v.record_b)}
        )
        audit_cli(hub, conn, "duplicates.list", f"pairs:{len(views)}")
    for v in views:
        out.print(Text.assemble((f"pair {v.id}", "bold"), f" score {v.score:.2f} ({v.status})"))
        for rid, site in ((v.record_a, v.site_a), (v.record_b, v.site_b)):
            out.print(f"  {names.get(rid, '?')}  {rid}  site {site}")
        for e in v.explanation:
            if e["outcome"] != "missing":
                out.print(f"    {e['field']:14} {e['outcome']:9} {e['detail']}")
    out.print(f"{len(views)} {status} pair(s)")


@dedup_app.command("scan")
def dedup_scan(
    data_dir: DataDir = None,
    chunk: Annotated[int, typer.Option(min=1, max=10_000, help="Records per transaction.")] = 500,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Processes scoring (default: the CPUs, at most 4)."),
    ] = None,
) -> None:
    """Re-check every record for possible duplicates (pairs already known stay as they are)."""
    hub = open_hub(data_dir)
    with hub.engine.connect() as conn:
        ids = dedup_check.all_record_ids(conn)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("scanning", total=len(ids))
        refiled: list[TaskID] = []

        def refiling(done: int, total: int) -> None:
            # Before the scan proper: the records still queued for their check
            # or, after an upgrade that changed the matcher, every record.
            if not refiled:
                refiled.append(bar.add_task("refiling blocking keys", total=total))
            bar.update(refiled[0], completed=done)

        try:
            queued = scan(
                hub.engine,
                ids,
                master_key=hub.secrets.master_key,
                cache=hub.profiles,
                chunk=chunk,
                workers=workers or min(4, os.cpu_count() or 1),
                progress=lambda checked: bar.advance(task, checked),
                refiling=refiling,
            )
        except ScanStopped as exc:
            bar.stop()
            fail(
                f"the scan stopped: {exc}; the pairs it found so far are queued,"
                " run it again to check the rest (--workers 1 uses less memory)",
                code=1,
            )
    with hub.engine.begin() as conn:
        audit_cli(hub, conn, "duplicates.scan", f"records:{len(ids)}", detail={"queued": queued})
    out.print(f"checked {len(ids)} record(s); {queued} new possible duplicate pair(s) queued")


def _threshold(text: str | None) -> float:
    if text is None:
        return OPERATING_THRESHOLD
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        fail(f"--threshold {text!r}: use a number from 0 to 1, e.g. {OPERATING_THRESHOLD}")
    return value


def _read(source: str) -> str:
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror or exc}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{source} is not UTF-8 text (byte {exc.start})")


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.resolve() == other.resolve() or (
            one.exists() and other.exists() and one.samefile(other)
        )
    except OSError:
        return False


def _check_out(source: str, out: str) -> None:
    """Refuse an --out that is empty, a directory, or the input itself."""
    if not out.strip():
        fail("--out is empty: give a file name for the pairs, or - for stdout")
    if out == "-":
        return
    if Path(out).is_dir():
        fail(f"--out {out}: is a directory; give the name of the file to write")
    if source != "-" and _same_file(Path(source), Path(out)):
        fail(f"--out {out} is the input file: writing there would replace it; choose another")


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
        temporary = None
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    finally:  # whatever stopped the writing (an interrupt too): no .dedup-*.csv left
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def _pairs(parsed: Parsed, threshold: float) -> list[Pair]:
    total = len(parsed.records)
    if total < PROGRESS_FROM_RECORDS or not err.is_terminal:
        return find_pairs(parsed.records, threshold=threshold)
    columns = ("scoring", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("scoring", total=total)
        return find_pairs(
            parsed.records, threshold=threshold, progress=lambda n: progress.advance(task, n)
        )


def dedup_file(
    input_file: Annotated[
        str,
        typer.Argument(
            metavar="INPUT", help="JSON Lines, CSV or TSV (.tsv) of registrations; - for stdin."
        ),
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
        fail(f"--format {input_format!r}: use auto, json or csv")
    _check_out(input_file, out)
    text = _read(input_file)
    try:
        parsed = parse(text, fmt=input_format, name=input_file)
    except InputError as exc:
        fail(f"{input_file}: {exc}")
    for bad in parsed.bad[:_SHOWN_BAD_LINES]:
        err.print(Text.assemble(("skipped", "yellow"), f" {bad}"), highlight=False)
    if len(parsed.bad) > _SHOWN_BAD_LINES:
        more = len(parsed.bad) - _SHOWN_BAD_LINES
        err.print(Text.assemble(("skipped", "yellow"), f" {more} more lines"))
    if parsed.bad and strict:
        fail(f"{len(parsed.bad)} unreadable line(s) and --strict: nothing written")
    if not parsed.records:
        fail(f"{input_file}: no readable record")
    pairs = _pairs(parsed, limit)
    _write(pairs, out)
    where = "stdout" if out == "-" else out
    err.print(
        f"{len(parsed.records):,} records, {len(parsed.bad):,} skipped; "
        f"{len(pairs):,} pairs at or above {limit} written to {where}"
    )
