"""Hub settings, from `FIELDREG_HUB_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_DATABASE", "HubSettings"]

DEFAULT_DATABASE = "hub.db"
"""The SQLite file in the data directory when no database URL is set."""

_DAY_MS = 86_400_000


class HubSettings(BaseSettings):
    """Everything the hub reads from its environment, with sane defaults.

    `database_url` defaults to an SQLite file inside `data_dir`.
    """

    model_config = SettingsConfigDict(env_prefix="FIELDREG_HUB_", extra="ignore")

    data_dir: Path = Field(
        default=Path("hub-data"), description="Keys, master key and SQLite file."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; SQLite in data_dir if unset."
    )
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    pull_page_edits: int = Field(default=1000, ge=1, le=10_000)
    pull_page_bytes: int = Field(default=1024 * 1024, ge=1024)
    clock_max_ahead_ms: int = Field(default=60_000, ge=0)
    clock_flag_ms: int = Field(default=300_000, ge=0)
    clock_refuse_ahead_ms: int = Field(
        default=3650 * _DAY_MS,
        ge=_DAY_MS,
        le=100 * 3650 * _DAY_MS,
        description="An edit stamped further than this ahead of the hub's clock is"
        " quarantined (clock.ahead), never applied nor served: every device that"
        " pulled it would follow its stamp. Large by default: a device whose clock"
        " ran that far ahead keeps stamping ahead after its clock is set right.",
    )
    busy_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds a transaction waits for a database lock before giving up"
        " (503 database.unavailable over HTTP; one line and exit code 1 at the CLI).",
    )
    sqlite_mmap_mb: int = Field(
        default=2048,
        ge=0,
        description="SQLite only: MiB of the database file read through a memory map"
        " (0: off; SQLite stops at 2 GiB). A duplicate check at a million records reads"
        " hundreds of scattered rows, a quarter faster mapped than copied in.",
    )
    profile_cache: int = Field(
        default=50_000,
        ge=0,
        description="Match profiles kept in memory for duplicate checks (0: none).",
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / DEFAULT_DATABASE).resolve()}"
