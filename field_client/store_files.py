"""The device store's files: the data directory, the key file (`store.key`:
the database's data key wrapped under the passphrase) and the SQLCipher
database (`store.db`).

Making them (`create`, which leaves no half-made store behind), unlocking them
(`unlock`, which also finishes or forgets a passphrase change that stopped
part-way), re-encrypting them under a new passphrase (`change_passphrase`),
and the errors for a directory that holds no store, a half-made one, or one
that cannot hold one. Nothing here reads or writes records: each function
hands the opened engine to `field_client.store.Store`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa

from field_client import db
from field_client.unlock import KeyFile, WrongPassphrase, check_passphrase_strength, new_key_file
from schemas.ids import uuid7
from sync.hlc import Stamp

__all__ = [
    "DB_NAME",
    "KEY_NAME",
    "PENDING_KEY_NAME",
    "NoStore",
    "StoreBusy",
    "StoreExists",
    "UnfinishedStore",
    "UnusableDataDir",
    "change_passphrase",
    "check_present",
    "create",
    "create_unencrypted_for_benchmark",
    "unlock",
]

_Opened = TypeVar("_Opened")

DB_NAME = "store.db"
KEY_NAME = "store.key"
PENDING_KEY_NAME = KEY_NAME + ".new"  # a passphrase change's new key file, until it is done


class NoStore(FileNotFoundError):
    """No key file in the directory: no store was made there."""


class StoreExists(FileExistsError):
    """`init` on a directory that already holds a store."""


class StoreBusy(RuntimeError):
    """A passphrase change while another connection has the store open: nothing changed."""


class UnfinishedStore(ValueError):
    """A database whose `init` stopped before it wrote the device's identity."""


class UnusableDataDir(OSError):
    """`init` cannot make a store at that path (a file, no permission): nothing made."""


def _remove_store_files(data_dir: Path) -> None:
    for name in (KEY_NAME, DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"):
        (data_dir / name).unlink(missing_ok=True)


def _bootstrap(engine: sa.Engine, *, site: str, operator: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(db.meta),
            [
                {"key": "device_id", "value": str(uuid7())},
                {"key": "site", "value": site},
                {"key": "operator", "value": operator},
                {"key": "hlc", "value": Stamp(0, 0).encode()},
                {"key": "device_seq", "value": "0"},
                {"key": "pushed_seq", "value": "0"},
            ],
        )


def _make_data_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise UnusableDataDir(f"{data_dir} is a file, not a directory: choose another --data-dir")
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _unusable(data_dir, exc) from None


def _unusable(data_dir: Path, exc: OSError) -> UnusableDataDir:
    reason = (exc.strerror or str(exc)).lower()
    return UnusableDataDir(
        f"cannot make a store in {data_dir} ({reason}): choose another --data-dir"
    )


def _missing_database(db_path: Path, state: str) -> db.MissingDatabase:
    return db.MissingDatabase(
        f"{db_path} is {state}: the store cannot be opened without its database;"
        " put it back from a backup (nothing was changed)"
    )


def check_present(data_dir: Path) -> None:
    """Raise `NoStore` or `db.MissingDatabase` (both FileNotFoundError) unless
    `data_dir` holds a key file and a database: check before asking for a passphrase."""
    if not (data_dir / KEY_NAME).exists():
        raise NoStore(f"no store in {data_dir}: run `fieldreg init` first")
    if not (data_dir / DB_NAME).is_file():
        raise _missing_database(data_dir / DB_NAME, "missing")


def create(
    data_dir: Path,
    passphrase: str,
    *,
    site: str,
    operator: str,
    kdf_memory_kib: int,
    open_engine: Callable[[sa.Engine], _Opened],
) -> _Opened:
    """Make the key file and the database of a new store in `data_dir` (made if
    needed), write the device's identity, and return `open_engine(engine)`.

    Raises `UnusableDataDir` or `StoreExists` before making anything. If any
    later step fails (`open_engine` included), the store's files are removed:
    a store that was never finished holds no one. Checks neither the
    passphrase nor `site` and `operator`: `Store.init` does.
    """
    _make_data_dir(data_dir)
    if (data_dir / KEY_NAME).exists() or (data_dir / DB_NAME).exists():
        raise StoreExists(f"{data_dir} already holds a store")
    data_key = os.urandom(32)
    key_file = new_key_file(passphrase, data_key, memory_kib=kdf_memory_kib)
    with db.private_umask():
        try:
            key_file.save(data_dir / KEY_NAME)
        except OSError as exc:
            raise _unusable(data_dir, exc) from None
        try:
            engine = db.connect_engine(data_dir / DB_NAME, data_key, create=True)
            _bootstrap(engine, site=site, operator=operator)
            return open_engine(engine)
        except Exception:
            # A store that was never finished holds no one: leave no files that
            # would make the next `init` say the directory holds a store.
            _remove_store_files(data_dir)
            raise


def create_unencrypted_for_benchmark(data_dir: Path, *, site: str, operator: str) -> sa.Engine:
    """The same database without SQLCipher and without a key file, only to
    measure what encryption costs (`Store.init_unencrypted_for_benchmark`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.connect_engine(data_dir / DB_NAME, None, create=True)
    _bootstrap(engine, site=site, operator=operator)
    return engine


def unlock(data_dir: Path, passphrase: str, open_engine: Callable[[sa.Engine], _Opened]) -> _Opened:
    """`open_engine` on the unlocked database; nothing is touched or created when
    it does not open. A passphrase change that stopped part-way is finished (the
    new passphrase opened the re-keyed database) or forgotten (the old one opened it).

    Raises as `Store.open` says.
    """
    check_present(data_dir)
    key_path, pending = data_dir / KEY_NAME, data_dir / PENDING_KEY_NAME
    try:
        store = _unlock(data_dir, key_path, passphrase, open_engine)
    except (WrongPassphrase, db.DatabaseLocked) as exc:
        if not pending.exists():
            raise
        # A passphrase change stopped part-way (`change_passphrase`): if the
        # database was re-keyed already, the new key file opens it.
        try:
            store = _unlock(data_dir, pending, passphrase, open_engine)
        except (WrongPassphrase, db.DatabaseLocked):
            if isinstance(exc, db.DatabaseLocked):
                raise WrongPassphrase(
                    "a passphrase change was interrupted after the store was re-encrypted:"
                    " open it with the new passphrase"
                ) from None
            raise exc from None
        os.replace(pending, key_path)  # finish the change
        return store
    pending.unlink(missing_ok=True)  # a change stopped before the database was re-keyed
    return store


def _unlock(
    data_dir: Path,
    key_path: Path,
    passphrase: str,
    open_engine: Callable[[sa.Engine], _Opened],
) -> _Opened:
    db_path = data_dir / DB_NAME
    data_key = KeyFile.load(key_path).unwrap(passphrase)
    try:
        with db.private_umask():
            engine = db.connect_engine(db_path, data_key)
    except db.MissingDatabase:
        raise _missing_database(db_path, "empty" if db_path.exists() else "missing") from None
    except db.DatabaseLocked:
        raise db.DatabaseLocked(
            f"{db_path}: the key does not open this store: the database is damaged or"
            f" not the one of {KEY_NAME}; put both back from one backup (nothing was changed)"
        ) from None
    return open_engine(engine)


def change_passphrase(conn: sa.Connection, data_dir: Path, old: str, new: str) -> None:
    """Re-wrap the data key under `new` and re-encrypt the database open on `conn`
    with a fresh key; commits `conn`'s transaction, if any. Refuses a weak `new`
    (`WeakPassphrase`) and a wrong `old` (`WrongPassphrase`) before changing anything.

    Order matters for crash safety: the new key file is written beside the
    old one first, the database is re-keyed, then the new file replaces the
    old. `unlock` finishes a change that stopped after the re-keying (the new
    passphrase opens the store) and forgets one that stopped before it.

    Raises `StoreBusy`, the new key file removed and the store as it was, when
    another connection has the database open (another `fieldreg` command, a
    `sync --watch`): SQLite then can neither leave WAL mode nor re-key.
    """
    check_passphrase_strength(new)
    key_path = data_dir / KEY_NAME
    KeyFile.load(key_path).unwrap(old)  # raises WrongPassphrase
    new_key = os.urandom(32)
    pending = data_dir / PENDING_KEY_NAME
    with db.private_umask():
        new_key_file(new, new_key).save(pending)
    raw = conn.connection.dbapi_connection
    assert raw is not None
    conn.commit()
    try:
        # SQLCipher cannot re-key a database in WAL mode: leave it, re-key, return.
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw.execute("PRAGMA journal_mode = DELETE")
        raw.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
    except db.DriverOperationalError:
        # Refused as a whole (a re-key is one transaction): still the old key.
        pending.unlink()
        with contextlib.suppress(db.DriverOperationalError):
            raw.execute("PRAGMA journal_mode = WAL")  # else the next opening sets it
        raise StoreBusy(
            "another fieldreg command has the store open (a sync --watch?): close other"
            " fieldreg commands and try again; the passphrase was not changed"
        ) from None
    with contextlib.suppress(db.DriverOperationalError):
        raw.execute("PRAGMA journal_mode = WAL")  # re-keyed: the next opening sets it else
    os.replace(pending, key_path)
