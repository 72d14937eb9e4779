"""`fieldreg-hub user ...`: the people who log in to the hub (add, list,
disable, enable, reset-password). `register(app)` adds them to the hub's CLI
(`server.cli` calls it). Every change is audited as done by `cli:admin`.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.text import Text

from server import accounts
from server.accounts import Role
from server.cli_common import (
    DataDir,
    audit_cli,
    fail,
    is_text,
    open_hub,
    out,
    password_from,
    table_of,
)
from server.hub import Hub
from server.problems import Problem

__all__ = ["register", "user_app"]

user_app = typer.Typer(help="People who log in to the hub.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the `user` group to `app`."""
    app.add_typer(user_app, name="user")


def _new_password(prompt: str) -> str:
    from_env = password_from("FIELDREG_HUB_USER_PASSWORD")
    if from_env:
        return from_env
    try:
        first = getpass.getpass(f"{prompt}: ")
        if getpass.getpass(f"{prompt} (again): ") != first:
            fail("the two passwords differ")
    except (EOFError, OSError):
        fail("no password: set FIELDREG_HUB_USER_PASSWORD or run in a terminal")
    if not is_text(first):
        fail("the password is not UTF-8 text")
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
    problem = accounts.user_name_error(name)
    if problem:
        fail(f"user name {name!r}: {problem}")
    for site in sites or []:
        problem = accounts.site_code_error(site)
        if problem:
            fail(f"--site: {problem}")
    hub = open_hub(data_dir)
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
            audit_cli(
                hub,
                conn,
                "user.add",
                f"user:{name}",
                actor="cli:admin",
                detail={"role": role.value, "sites": sorted(user.sites)},
            )
    except Problem as exc:
        fail(exc.detail)
    scope = ", ".join(sorted(user.sites)) or "all sites"
    out.print(f"user {user.name} added as {user.role.value} ({scope})")


@user_app.command("list")
def user_list(data_dir: DataDir = None) -> None:
    """Every user: role, sites, state."""
    hub = open_hub(data_dir)
    with hub.engine.connect() as conn:
        found = accounts.list_users(conn)
    table = table_of("user", "role", "sites", "state")
    now = datetime.now(UTC)
    for u in found:
        state = (
            "disabled"
            if not u.is_active
            else "locked"
            if u.locked_until and u.locked_until > now
            else "active"
        )
        table.add_row(Text(u.name), u.role.value, Text(", ".join(sorted(u.sites)) or "all"), state)
    out.print(table)


def _change(hub: Hub, name: str, action: str, change: Callable[[Any], object]) -> None:
    """Run `change(conn)` on the hub's database and audit it as `action` on the user."""
    try:
        with hub.engine.begin() as conn:
            change(conn)
            audit_cli(hub, conn, action, f"user:{name}", actor="cli:admin")
    except Problem as exc:
        fail(exc.detail)


@user_app.command("disable")
def user_disable(name: Annotated[str, typer.Argument()], data_dir: DataDir = None) -> None:
    """Disable a user and end their sessions."""
    hub = open_hub(data_dir)
    _change(hub, name, "user.disable", lambda c: accounts.set_active(c, name, is_active=False))
    out.print(f"user {name} disabled; their sessions are ended")


@user_app.command("enable")
def user_enable(name: Annotated[str, typer.Argument()], data_dir: DataDir = None) -> None:
    """Enable a disabled user again."""
    hub = open_hub(data_dir)
    _change(hub, name, "user.enable", lambda c: accounts.set_active(c, name, is_active=True))
    out.print(f"user {name} enabled")


@user_app.command("reset-password")
def user_reset_password(name: Annotated[str, typer.Argument()], data_dir: DataDir = None) -> None:
    """Set a new password (asked, or FIELDREG_HUB_USER_PASSWORD); clears a lockout."""
    hub = open_hub(data_dir)
    password = _new_password("New password")
    _change(hub, name, "user.reset_password", lambda c: accounts.set_password(c, name, password))
    out.print(f"password of {name} reset; their sessions are ended")
