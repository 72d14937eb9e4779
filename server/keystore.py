"""The hub's secrets on disk: its key pairs and its master key, each a 0600 file.

The master key wraps the per-record data keys (crypto-shredding: destroying a
record's wrapped key erases it everywhere, backups included). Losing these
files loses the data; the deployment guide says how to back them up apart
from the database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sync.keys import KeyFormatError, KeyPairs

__all__ = ["KEYS_FILE", "MASTER_FILE", "HubSecrets"]

KEYS_FILE = "hub.keys"
MASTER_FILE = "master.key"


def _write_private(path: Path, data: bytes) -> None:
    """Write a new 0600 file whole, or leave none (a half-written key is no key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class HubSecrets:
    keys: KeyPairs
    master_key: bytes

    @classmethod
    def create(cls, data_dir: Path) -> HubSecrets:
        """Make new key pairs and a new master key; refuse to overwrite existing ones.
        Writes both files or, failing, neither (`remove` takes them away again)."""
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cls.check_absent(data_dir)
        secrets = cls(keys=KeyPairs.generate(), master_key=os.urandom(32))
        _write_private(data_dir / KEYS_FILE, secrets.keys.to_bytes())
        try:
            _write_private(data_dir / MASTER_FILE, secrets.master_key)
        except BaseException:
            (data_dir / KEYS_FILE).unlink(missing_ok=True)
            raise
        return secrets

    @staticmethod
    def remove(data_dir: Path) -> None:
        """Delete the files `create` wrote (an `init` that failed after it)."""
        for name in (KEYS_FILE, MASTER_FILE):
            (data_dir / name).unlink(missing_ok=True)

    @staticmethod
    def check_absent(data_dir: Path) -> None:
        """Raise FileExistsError if `data_dir` holds a hub's keys already."""
        for name in (KEYS_FILE, MASTER_FILE):
            if (data_dir / name).exists():
                raise FileExistsError(
                    f"{data_dir / name} exists: this directory already holds a hub"
                )

    @classmethod
    def load(cls, data_dir: Path) -> HubSecrets:
        """Read the hub's secrets; raise FileNotFoundError with a hint when absent,
        OSError when a file cannot be read (its `filename` says which) and
        ValueError naming the file when its content is not a key."""
        keys_path, master_path = data_dir / KEYS_FILE, data_dir / MASTER_FILE
        if not keys_path.exists() or not master_path.exists():
            raise FileNotFoundError(f"no hub keys in {data_dir}: run `fieldreg-hub init` first")
        master = master_path.read_bytes()
        if len(master) != 32:
            raise ValueError(f"{master_path} is not a 32-byte key: {_RESTORE}")
        try:
            keys = KeyPairs.from_bytes(keys_path.read_bytes())
        except KeyFormatError as exc:
            raise ValueError(f"{keys_path} is damaged ({exc}): {_RESTORE}") from None
        return cls(keys=keys, master_key=master)


_RESTORE = "restore it from its backup (docs/deployment.md)"
