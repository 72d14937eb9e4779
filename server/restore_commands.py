"""`fieldreg-hub restored`: give a hub restored from a backup a new epoch.

Run it after putting a backup of the database in place (and `migrate`), with
every hub process stopped, before they start again. Devices see the new epoch
in the hub's next answer and pull from the start; every pull page tells each
device how far the hub holds its own changes, and the device sends again
what the hub lost (see docs/deployment.md, "Restoring").

`register(app)` adds the command to the hub's CLI (`server.cli` calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

import typer

from schemas.ids import uuid7
from server import audit
from server import devices as device_store
from server.cli_common import DataDir, cli_request_id, open_hub
from server.db import write_lock
from server.hub import Hub

__all__ = ["Renewal", "register", "renew_epoch", "restored"]


@dataclass(frozen=True)
class Renewal:
    """What `renew_epoch` did, and what the restored database holds."""

    old_epoch: str
    epoch: str
    last_hub_seq: int
    devices: int
    newest_audit_at: str | None  # ISO 8601; about when the backup was taken


def renew_epoch(hub: Hub, *, request_id: str) -> Renewal:
    """Replace the hub's epoch with a new one, audited, in one transaction.

    Takes the write lock, so no push in another process numbers a change while
    the epoch changes. `hub.epoch` follows; other processes read the epoch when
    they start, so they must be (re)started after this.
    """
    new = uuid7().hex
    with hub.engine.begin() as conn:
        write_lock(conn)
        old = device_store.get_meta(conn, "epoch")
        if old is None:
            raise RuntimeError("the hub database is not initialised: run `fieldreg-hub init`")
        newest = audit.recent(conn, limit=1)
        renewal = Renewal(
            old_epoch=old,
            epoch=new,
            last_hub_seq=device_store.last_hub_seq(conn),
            devices=len(device_store.list_devices(conn)),
            newest_audit_at=str(newest[0]["at"]) if newest else None,
        )
        device_store.set_meta(conn, "epoch", new)
        hub.audit(
            conn,
            actor="cli:hub",
            action="hub.restored",
            target=f"epoch:{new}",
            request_id=request_id,
            detail={
                "old_epoch": old,
                "epoch": new,
                "last_hub_seq": renewal.last_hub_seq,
                "devices": renewal.devices,
            },
        )
    hub.epoch = new
    return renewal


def register(app: typer.Typer) -> None:
    """Add the `restored` command to `app`."""
    app.command("restored")(restored)


def restored(data_dir: DataDir = None) -> None:
    """After restoring the database from a backup: give the hub a new epoch.

    Stop every hub process first and start them after. Devices then pull from
    the start and send again their changes the backup does not hold.
    """
    hub = open_hub(data_dir)
    try:
        renewal = renew_epoch(hub, request_id=cli_request_id())
    finally:
        hub.engine.dispose()
    since = renewal.newest_audit_at or "the start"
    typer.echo(f"new hub epoch {renewal.epoch} (was {renewal.old_epoch})")
    typer.echo(
        f"the restored database holds hub sequences up to {renewal.last_hub_seq} and"
        f" {renewal.devices} enrolled device(s); its newest audit entry is from {since}"
    )
    typer.echo(
        "next: start every hub process. On their next `fieldreg sync` devices pull from"
        " the start and send again their own changes this database does not hold."
    )
    typer.echo(
        f"not sent again by any device: what the hub itself did after {since} (conflict"
        " resolutions, merges, revocations, enrolments, accounts). Your `fieldreg-hub audit"
        " export` archives list it; devices enrolled after it must be enrolled again."
    )
