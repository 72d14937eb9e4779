"""`fieldreg-hub`: set up, run and administer a hub from its own machine."""

from __future__ import annotations

import gc
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, NoReturn

import sqlalchemy as sa
import typer
from rich.text import Text

from server import (
    accounts,
    admin,
    audit_commands,
    dedup_commands,
    restore_commands,
    user_commands,
)
from server import devices as device_store
from server.cli_common import (
    DataDir,
    audit_cli,
    cli_request_id,
    database_reason,
    err,
    fail,
    file_reason,
    is_text,
    open_hub,
    out,
    password_from,
    settings_for,
    table_of,
)
from server.db import make_engine, migrate
from server.keystore import KEYS_FILE
from server.problems import Problem

__all__ = ["app", "main"]

app = typer.Typer(
    name="fieldreg-hub",
    help="The fieldreg hub: receives encrypted batches from field devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
device_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
app.add_typer(device_app, name="device")


MAX_RECORDS_LISTED = 1_000_000
"""The most `records --limit` lists (each one unsealed, in memory)."""
MAX_CODE_VALIDITY = timedelta(days=90)
"""The longest an enrolment code may stay valid (`--expires`)."""
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"0*(\d+)\s*([mhd])", text.strip())  # the digits: no leading 0
    if not match:
        fail(f"--expires {text!r}: use a number and m, h or d, e.g. 30m, 24h, 7d")
    digits = match.group(1)
    too_long = len(digits) > 6 or _UNITS[match.group(2)] * int(digits) > MAX_CODE_VALIDITY
    if digits == "0" or too_long:
        fail(f"--expires {text!r}: a code may stay valid from 1m up to 90d (2160h)")
    return _UNITS[match.group(2)] * int(digits)


@app.command()
def init(
    data_dir: DataDir = None,
    admin_name: Annotated[
        str, typer.Option("--admin", help="Name of the first administrator.")
    ] = "admin",
) -> None:
    """Create the hub's key pairs, master key (0600), database and first admin."""
    settings = settings_for(data_dir)
    password = password_from("FIELDREG_HUB_ADMIN_PASSWORD")  # empty: generated, and shown
    try:
        result = admin.initialise(settings, admin=admin_name, admin_password=password)
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        if isinstance(exc, FileExistsError) and exc.filename is None:
            fail(str(exc))  # a hub is there already: nothing was made
        fail(f"init: {file_reason(exc)}; nothing was kept")
    except sa.exc.DBAPIError as exc:
        fail(f"init: the database refused ({database_reason(exc)}); nothing was kept")
    out.print(f"hub initialised in {result.data_dir!s}")
    out.print(Text.assemble("hub key fingerprint: ", (result.fingerprint, "bold")))
    admin_shown = repr(result.admin)
    if result.admin_password:
        out.print(
            f"admin {admin_shown} password (shown once): {result.admin_password}",
            highlight=False,
        )
    else:
        out.print(f"admin {admin_shown} password taken from FIELDREG_HUB_ADMIN_PASSWORD")


@app.command()
def serve(
    data_dir: DataDir = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
) -> None:
    """Run the hub's HTTP API (uvicorn)."""
    import uvicorn

    from server.app import create_app

    hub = open_hub(data_dir)
    out.print(f"hub {hub.public_keys.fingerprint()} listening on http://{host}:{port}")
    # What startup made lives as long as the process: keep it out of the cyclic
    # collector's scans, and let young objects pile up more before a collection
    # (a push batch allocates hundreds of thousands). Measured: -18% hub CPU.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    uvicorn.run(create_app(hub.settings, hub=hub), host=host, port=port, log_level="warning")


@app.command("migrate")
def migrate_cmd(data_dir: DataDir = None) -> None:
    """Bring the database schema to the latest version."""
    settings = settings_for(data_dir)
    if not settings.data_dir.is_dir():
        fail(f"the data directory {settings.data_dir} does not exist: check --data-dir")
    if not (settings.data_dir / KEYS_FILE).exists():
        fail(f"{settings.data_dir} holds no hub (no {KEYS_FILE}): run `fieldreg-hub init` first")
    engine = make_engine(
        settings.resolved_database_url(),
        busy_timeout_s=settings.busy_timeout_s,
        mmap_mb=settings.sqlite_mmap_mb,
    )
    migrate(engine)
    out.print("database schema is up to date")


@app.command("enrol-code")
def enrol_code(
    sites: Annotated[
        list[str],
        typer.Option(
            "--site", help="A site the device will serve (repeat for a team covering several)."
        ),
    ],
    expires: Annotated[
        str, typer.Option(help="How long the code stays valid: 30m, 24h, 7d (at most 90d).")
    ] = "24h",
    data_dir: DataDir = None,
) -> None:
    """Print a one-time enrolment code for a device serving SITE (or several)."""
    for site in sites:
        problem = accounts.site_code_error(site)
        if problem:
            fail(f"--site: {problem}")
    valid_for = _duration(expires)
    hub = open_hub(data_dir)
    code = hub.create_enrol_code(sites, valid_for, request_id=cli_request_id())
    shown = ", ".join(sites)
    out.print(
        Text.assemble(f"enrolment code for site {shown}: ", (code, "bold"), f" (valid {expires})")
    )
    out.print(f"hub key fingerprint: {hub.public_keys.fingerprint()}")


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = int((now - when).total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


@device_app.command("list")
def device_list(data_dir: DataDir = None) -> None:
    """Each device: sites, last contact, high-water mark, clock offset."""
    hub = open_hub(data_dir)
    now = datetime.now(UTC)
    flag_ms = hub.settings.clock_flag_ms
    with hub.engine.connect() as conn:
        rows = device_store.list_devices(conn)
    table = table_of("device", "sites", "last contact", "high-water", "clock offset", "status")
    for d in rows:
        offset = Text("?" if d.clock_offset_ms is None else f"{d.clock_offset_ms / 1000:+.1f}s")
        if d.clock_offset_ms is not None and abs(d.clock_offset_ms) > flag_ms:
            offset.append(" CLOCK OFF", style="red")
        status = (
            Text.assemble(("revoked", "red"), f" ({d.revoked_reason})")
            if d.is_revoked
            else Text("active")
        )
        table.add_row(
            Text(d.id),
            Text(",".join(sorted(d.sites))),
            _ago(d.last_contact_at, now),
            str(d.high_water),
            offset,
            status,
        )
    out.print(table)


@device_app.command("revoke")
def device_revoke(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[
        str, typer.Option(help="Why (kept with the device).")
    ] = "revoked by administrator",
    data_dir: DataDir = None,
) -> None:
    """Revoke a device: later batches are refused and kept in quarantine."""
    hub = open_hub(data_dir)
    now = datetime.now(UTC)
    try:
        with hub.engine.begin() as conn:
            device, revoked = device_store.revoke_device(conn, device_id, reason=reason, now=now)
            if revoked:
                audit_cli(hub, conn, "device.revoke", f"device:{device.id}", actor="cli:admin")
    except Problem as exc:
        fail(exc.detail)
    if not revoked:
        when = f"{device.revoked_at:%Y-%m-%d %H:%M} UTC" if device.revoked_at else "earlier"
        out.print(
            f"device {device.id} was already revoked on {when}"
            f" ({device.revoked_reason or ''}); that reason is kept, nothing changed",
            highlight=False,
        )
        return
    out.print(f"device {device.id} revoked; its next contact is told to wipe itself")


@app.command()
def records(
    data_dir: DataDir = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_RECORDS_LISTED)] = 100,
) -> None:
    """What the hub holds (names are unsealed: identifying data)."""
    hub = open_hub(data_dir)
    views = admin.list_records(hub.engine, hub.secrets.master_key, limit=limit)
    with hub.engine.begin() as conn:  # a read of identifying data, like any other
        audit_cli(hub, conn, "records.list", f"records:{len(views)}")
    table = table_of("id", "site", "name", "scenario", "nationality", "needs")
    for v in views:
        cells = (
            v.id,
            v.site,
            v.name,
            v.scenario or "",
            ",".join(v.nationalities),
            ",".join(v.needs),
        )
        table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    out.print(f"{len(views)} record(s)")


@app.command()
def conflicts(data_dir: DataDir = None) -> None:
    """Open conflicts, both sides."""
    hub = open_hub(data_dir)
    views = admin.list_conflicts(hub.engine, hub.secrets.master_key)
    with hub.engine.begin() as conn:
        audit_cli(hub, conn, "conflicts.list", f"conflicts:{len(views)}")
    for c in views:
        where = f"record {c.record_id} (site {c.site})"
        out.print(
            Text.assemble((f"conflict {c.id}", "bold"), f" {where} field ", (c.field, "bold"))
        )
        for label, side in (("held", c.current), ("incoming", c.incoming)):
            mark = "  <- applied for now" if side["d"] == c.winner_device else ""
            shown = f"{side['v']!r} by {side['o'] or '?'} on device {side['d'][-8:]}{mark}"
            out.print(f"  {label:9} {shown}")
    out.print(f"{len(views)} open conflict(s)")


@app.command("quarantine")
def quarantine_cmd(data_dir: DataDir = None) -> None:
    """Batches and edits the hub refused to apply, with why."""
    hub = open_hub(data_dir)
    items = admin.list_quarantine(hub.engine)
    for item in items:
        line = f"{item['id']}: device {item['device']} batch {item['batch']}: {item['detail']}"
        out.print(line)
    out.print(f"{len(items)} quarantined item(s)")


audit_commands.register(app)
dedup_commands.register(app)
restore_commands.register(app)
user_commands.register(app)


def _stop(message: str, code: int = 1) -> NoReturn:
    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main() -> None:
    # Database errors end in one line, never a traceback nor the statement and
    # its parameters (identifying data). The transaction that failed changed
    # nothing; one committed before it stays.
    for position, argument in enumerate(sys.argv[1:], start=1):
        if not is_text(argument):  # a name, reason or path in another encoding
            _stop(f"argument {position} ({argument!r}) is not UTF-8 text", code=2)
    try:
        app()
    except sa.exc.OperationalError as exc:
        # Locked past FIELDREG_HUB_BUSY_TIMEOUT_S (another hub process busy), or
        # PostgreSQL gone.
        _stop(
            f"the database did not answer ({database_reason(exc)}); the step that"
            " failed changed nothing: run the command again when the hub is less busy"
        )
    except sa.exc.DBAPIError as exc:  # refused: rights, constraints, a schema not migrated
        _stop(
            f"the database refused ({database_reason(exc)}); the step that failed changed nothing"
        )
    except sa.exc.ArgumentError as exc:  # FIELDREG_HUB_DATABASE_URL unusable
        _stop(f"FIELDREG_HUB_DATABASE_URL cannot be used: {exc}")
