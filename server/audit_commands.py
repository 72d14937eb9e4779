"""`fieldreg-hub audit verify | export`: prove the audit chain intact, archive the log.

`register(app)` adds the `audit` group to the hub's CLI.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TextIO

import typer

from server import audit
from server.cli_common import DataDir, fail, open_hub
from server.hub import Hub

__all__ = ["audit_app", "register"]

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the `audit` commands (verify, export) to `app`."""
    app.add_typer(audit_app, name="audit")


def _since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since {text!r}: use ISO 8601, e.g. 2026-11-29 or 2026-11-29T10:00:00Z")
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)  # naive means UTC
    try:
        return when.astimezone(UTC)
    except OverflowError:  # an offset past year 1 or 9999 in UTC: every entry, or none
        return (datetime.min if when.year == 1 else datetime.max).replace(tzinfo=UTC)


@audit_app.command("verify")
def verify_cmd(data_dir: DataDir = None) -> None:
    """Recompute the hash chain and check the hub's signed checkpoints.

    Exit 0 when intact, 1 when broken (naming the first broken entry).
    """
    hub = open_hub(data_dir)
    try:
        with hub.engine.connect() as conn:
            result = audit.verify(conn, hub.public_keys.signing_public_key())
    finally:
        hub.engine.dispose()
    if not result.is_intact:
        typer.echo(f"BROKEN at entry {result.first_broken_id}: {result.reason}")
        raise typer.Exit(1)
    typer.echo(f"checked {result.entries} entries and {result.checkpoints} checkpoints: intact")


def _write(hub: Hub, since: datetime | None, sink: TextIO) -> tuple[int, int]:
    counts = {"entry": 0, "checkpoint": 0}
    with hub.engine.connect() as conn:
        for item in audit.export(conn, since=since):
            sink.write(json.dumps(item, separators=(",", ":")) + "\n")
            counts[item["kind"]] += 1
    return counts["entry"], counts["checkpoint"]


@audit_app.command("export")
def export_cmd(
    since: Annotated[
        str | None,
        typer.Option(help="Start at the first entry at or after this ISO 8601 time (UTC if bare)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Entries and signed checkpoints as JSON Lines, for an archive kept elsewhere."""
    start = _since(since) if since is not None else None
    if out is not None:
        _check_target(out)
    hub = open_hub(data_dir)
    try:
        if out is None:
            _write(hub, start, sys.stdout)
            return
        entries, marks = _write_file(hub, start, out)
    finally:
        hub.engine.dispose()
    typer.echo(f"exported {entries} entries and {marks} checkpoints to {out}", err=True)


def _check_target(out: Path) -> None:
    if out.is_dir():
        fail(f"--out {out}: is a directory; give the name of the file to write")
    if not out.parent.is_dir():
        fail(f"--out {out}: there is no directory {out.parent}; create it or choose another")


def _write_file(hub: Hub, since: datetime | None, out: Path) -> tuple[int, int]:
    """Write beside `out`, then rename: a failed export leaves no half-written archive."""
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=".audit-", suffix=".jsonl", dir=out.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as sink:
            counts = _write(hub, since, sink)
        os.replace(temporary, out)
        temporary = None
    except OSError as exc:
        fail(f"--out {out}: cannot write it ({exc.strerror or exc}); nothing was written")
    finally:  # a database error or an interrupt too: no .audit-*.jsonl left
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
    return counts
