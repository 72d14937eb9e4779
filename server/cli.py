"""`fieldreg-hub`: set up, run and administer a hub from its own machine."""

from __future__ import annotations

import gc
import getpass
import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from schemas.record import RegistrationContext
from schemas.validation import InvalidRecord, validate
from server import (
    accounts,
    admin,
    audit_commands,
    dedup_check,
    dedup_commands,
    duplicates,
    restore_commands,
)
from server import devices as device_store
from server.accounts import Role
from server.db import make_engine, migrate, write_lock
from server.hub import Hub
from server.problems import Problem
from server.settings import HubSettings

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
user_app = typer.Typer(help="People who log in to the hub.", no_args_is_help=True)
app.add_typer(user_app, name="user")
dedup_app = typer.Typer(help="The duplicate queue.", no_args_is_help=True)
app.add_typer(dedup_app, name="dedup")
out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", envvar="FIELDREG_HUB_DATA_DIR", help="Hub keys, master key, SQLite file."
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _settings(data_dir: Path | None) -> HubSettings:
    settings = HubSettings()
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    return settings


def _hub(data_dir: Path | None) -> Hub:
    try:
        return Hub(_settings(data_dir))
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        fail(str(exc))


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)\s*([mhd])", text.strip())
    if not match or int(match.group(1)) == 0:
        fail(f"--expires {text!r}: use a number and m, h or d, e.g. 30m, 24h, 7d")
    unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


@app.command()
def init(
    data_dir: DataDir = None,
    admin_name: Annotated[
        str, typer.Option("--admin", help="Name of the first administrator.")
    ] = "admin",
) -> None:
    """Create the hub's key pairs, master key (0600), database and first admin."""
    settings = _settings(data_dir)
    password = os.environ.get("FIELDREG_HUB_ADMIN_PASSWORD")
    try:
        result = admin.initialise(settings, admin=admin_name, admin_password=password)
    except FileExistsError as exc:
        fail(str(exc))
    out.print(f"hub initialised in {result.data_dir}")
    out.print(f"hub key fingerprint: [bold]{result.fingerprint}[/bold]")
    if result.admin_password:
        out.print(f"admin {result.admin!r} password (shown once): {result.admin_password}")
    else:
        out.print(f"admin {result.admin!r} password taken from FIELDREG_HUB_ADMIN_PASSWORD")


@app.command()
def serve(
    data_dir: DataDir = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
) -> None:
    """Run the hub's HTTP API (uvicorn)."""
    import uvicorn

    from server.app import create_app

    hub = _hub(data_dir)
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
    settings = _settings(data_dir)
    engine = make_engine(settings.resolved_database_url())
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
        str, typer.Option(help="How long the code stays valid: 30m, 24h, 7d.")
    ] = "24h",
    data_dir: DataDir = None,
) -> None:
    """Print a one-time enrolment code for a device serving SITE (or several)."""
    for site in sites:
        context = {"site": site, "device_id": "x", "operator": "x", "registered_at": "2000-01-01"}
        try:
            validate(RegistrationContext, {**context, "registered_at": "2000-01-01T00:00:00Z"})
        except InvalidRecord as exc:
            fail(str(exc))
    valid_for = _duration(expires)
    hub = _hub(data_dir)
    code = hub.create_enrol_code(sites, valid_for)
    out.print(f"enrolment code for site {', '.join(sites)}: [bold]{code}[/bold] (valid {expires})")
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
    hub = _hub(data_dir)
    now = datetime.now(UTC)
    flag_ms = hub.settings.clock_flag_ms
    with hub.engine.connect() as conn:
        rows = device_store.list_devices(conn)
    table = Table("device", "sites", "last contact", "high-water", "clock offset", "status")
    for d in rows:
        offset = "?" if d.clock_offset_ms is None else f"{d.clock_offset_ms / 1000:+.1f}s"
        if d.clock_offset_ms is not None and abs(d.clock_offset_ms) > flag_ms:
            offset += " [red]CLOCK OFF[/red]"
        status = f"[red]revoked[/red] ({d.revoked_reason})" if d.is_revoked else "active"
        table.add_row(
            d.id,
            ",".join(sorted(d.sites)),
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
    hub = _hub(data_dir)
    try:
        with hub.engine.begin() as conn:
            device = device_store.revoke_device(
                conn, device_id, reason=reason, now=datetime.now(UTC)
            )
    except Problem as exc:
        fail(exc.detail)
    out.print(f"device {device.id} revoked; its next contact is told to wipe itself")


def _cli_request_id() -> str:
    return f"cli-{uuid.uuid4().hex[:12]}"


def _new_password(prompt: str) -> str:
    from_env = os.environ.get("FIELDREG_HUB_USER_PASSWORD")
    if from_env:
        return from_env
    try:
        first = getpass.getpass(f"{prompt}: ")
        if getpass.getpass(f"{prompt} (again): ") != first:
            fail("the two passwords differ")
    except (EOFError, OSError):
        fail("no password: set FIELDREG_HUB_USER_PASSWORD or run in a terminal")
    return first


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[Role, typer.Option(help="What the user may do (see docs/permissions.md).")],
    sites: Annotated[
        list[str] | None,
        typer.Option("--site", help="A site in scope (repeat); none: all, for auditor/admin."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Add a user (password asked, or FIELDREG_HUB_USER_PASSWORD)."""
    hub = _hub(data_dir)
    password = _new_password("Password")
    try:
        with hub.engine.begin() as conn:
            user = accounts.add_user(
                conn,
                name=name,
                role=role,
                sites=sites or [],
                password=password,
                now=datetime.now(UTC),
            )
            hub.audit(
                conn,
                actor="cli:admin",
                action="user.add",
                target=f"user:{name}",
                request_id=_cli_request_id(),
                detail={"role": role.value, "sites": sorted(user.sites)},
            )
    except Problem as exc:
        fail(exc.detail)
    scope = ", ".join(sorted(user.sites)) or "all sites"
    out.print(f"user {user.name} added as {user.role.value} ({scope})")


@user_app.command("list")
def user_list(data_dir: DataDir = None) -> None:
    """Every user: role, sites, state."""
    hub = _hub(data_dir)
    with hub.engine.connect() as conn:
        found = accounts.list_users(conn)
    table = Table("user", "role", "sites", "state")
    now = datetime.now(UTC)
    for u in found:
        state = (
            "disabled"
            if not u.is_active
            else "locked"
            if u.locked_until and u.locked_until > now
            else "active"
        )
        table.add_row(u.name, u.role.value, ", ".join(sorted(u.sites)) or "all", state)
    out.print(table)


@user_app.command("disable")
def user_disable(name: Annotated[str, typer.Argument()], data_dir: DataDir = None) -> None:
    """Disable a user and end their sessions."""
    hub = _hub(data_dir)
    try:
        with hub.engine.begin() as conn:
            accounts.set_active(conn, name, is_active=False)
            hub.audit(
                conn,
                actor="cli:admin",
                action="user.disable",
                target=f"user:{name}",
                request_id=_cli_request_id(),
            )
    except Problem as exc:
        fail(exc.detail)
    out.print(f"user {name} disabled; their sessions are ended")


@user_app.command("enable")
def user_enable(name: Annotated[str, typer.Argument()], data_dir: DataDir = None) -> None:
    """Enable a disabled user again."""
    hub = _hub(data_dir)
    try:
        with hub.engine.begin() as conn:
            accounts.set_active(conn, name, is_active=True)
            hub.audit(
                conn,
                actor="cli:admin",
                action="user.enable",
                target=f"user:{name}",
                request_id=_cli_request_id(),
            )
    except Problem as exc:
        fail(exc.detail)
    out.print(f"user {name} enabled")


@user_app.command("reset-password")
def user_reset_password(name: Annotated[str, typer.Argument()], data_dir: DataDir = None) -> None:
    """Set a new password (asked, or FIELDREG_HUB_USER_PASSWORD); clears a lockout."""
    hub = _hub(data_dir)
    password = _new_password("New password")
    try:
        with hub.engine.begin() as conn:
            accounts.set_password(conn, name, password)
            hub.audit(
                conn,
                actor="cli:admin",
                action="user.reset_password",
                target=f"user:{name}",
                request_id=_cli_request_id(),
            )
    except Problem as exc:
        fail(exc.detail)
    out.print(f"password of {name} reset; their sessions are ended")


@dedup_app.command("list")
def dedup_list(
    data_dir: DataDir = None,
    status: Annotated[str, typer.Option(help="open, merged, rejected or unmerged")] = "open",
) -> None:
    """Possible duplicates with the names and why (identifying: audited)."""
    if status not in ("open", "merged", "rejected", "unmerged"):
        fail(f"--status {status!r}: choose open, merged, rejected or unmerged")
    hub = _hub(data_dir)
    hub.check_all_pending()  # records pushed moments ago are checked first
    with hub.engine.begin() as conn:
        pairs = duplicates.list_pairs(conn, sites=None, status=status, limit=1000, offset=0)
        views = [
            duplicates.get_pair(conn, p.id, sites=None, master_key=hub.secrets.master_key)
            for p in pairs
        ]
        names = admin.names_of(
            conn, hub.secrets.master_key, {i for v in views for i in (v.record_a, v.record_b)}
        )
        hub.audit(
            conn,
            actor="cli:hub",
            action="duplicates.list",
            target=f"pairs:{len(views)}",
            request_id=_cli_request_id(),
        )
    for v in views:
        out.print(f"[bold]pair {v.id}[/bold] score {v.score:.2f} ({v.status})")
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
) -> None:
    """Re-check every record for possible duplicates (pairs already known stay as they are)."""
    hub = _hub(data_dir)
    with hub.engine.connect() as conn:
        ids = dedup_check.all_record_ids(conn)
    queued = 0
    with Progress(
        TextColumn("scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("scan", total=len(ids))
        checked: set[str] = set()  # each pair is scored once, by its later record
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            with hub.engine.begin() as conn:
                write_lock(conn)  # a push's checker may be at work too
                queued += dedup_check.check_records(
                    conn,
                    part,
                    index=hub.block_index,
                    master_key=hub.secrets.master_key,
                    now=datetime.now(UTC),
                    cache=hub.profiles,
                    skip=checked,
                )
                dedup_check.clear_pending(conn, part)
            checked.update(part)
            bar.advance(task, len(part))
    with hub.engine.begin() as conn:
        hub.audit(
            conn,
            actor="cli:hub",
            action="duplicates.scan",
            target=f"records:{len(ids)}",
            request_id=_cli_request_id(),
            detail={"queued": queued},
        )
    out.print(f"checked {len(ids)} record(s); {queued} new possible duplicate pair(s) queued")


@app.command()
def records(
    data_dir: DataDir = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """What the hub holds (names are unsealed: identifying data)."""
    hub = _hub(data_dir)
    views = admin.list_records(hub.engine, hub.secrets.master_key, limit=limit)
    with hub.engine.begin() as conn:  # a read of identifying data, like any other
        hub.audit(
            conn,
            actor="cli:hub",
            action="records.list",
            target=f"records:{len(views)}",
            request_id=_cli_request_id(),
        )
    table = Table("id", "site", "name", "scenario", "nationality", "needs")
    for v in views:
        table.add_row(
            v.id, v.site, v.name, v.scenario or "", ",".join(v.nationalities), ",".join(v.needs)
        )
    out.print(table)
    out.print(f"{len(views)} record(s)")


@app.command()
def conflicts(data_dir: DataDir = None) -> None:
    """Open conflicts, both sides."""
    hub = _hub(data_dir)
    views = admin.list_conflicts(hub.engine, hub.secrets.master_key)
    with hub.engine.begin() as conn:
        hub.audit(
            conn,
            actor="cli:hub",
            action="conflicts.list",
            target=f"conflicts:{len(views)}",
            request_id=_cli_request_id(),
        )
    for c in views:
        where = f"record {c.record_id} (site {c.site})"
        out.print(f"[bold]conflict {c.id}[/bold] {where} field [bold]{c.field}[/bold]")
        for label, side in (("held", c.current), ("incoming", c.incoming)):
            mark = "  <- applied for now" if side["d"] == c.winner_device else ""
            out.print(
                f"  {label:9} {side['v']!r} by {side['o'] or '?'} on device {side['d'][-8:]}{mark}"
            )
    out.print(f"{len(views)} open conflict(s)")


@app.command("quarantine")
def quarantine_cmd(data_dir: DataDir = None) -> None:
    """Batches and edits the hub refused to apply, with why."""
    hub = _hub(data_dir)
    items = admin.list_quarantine(hub.engine)
    for item in items:
        out.print(f"{item['id']}: device {item['device']} batch {item['batch']}: {item['detail']}")
    out.print(f"{len(items)} quarantined item(s)")


audit_commands.register(app)
dedup_commands.register(app)
restore_commands.register(app)


def main() -> None:
    app()
