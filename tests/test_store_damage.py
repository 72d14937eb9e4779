"""A store directory that is not what `init` or `open` expects: one line, exit 2,
nothing created or changed. Real SQLCipher files and real `fieldreg` runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from field_client import db
from field_client.store import Store
from field_client.store_files import NoStore, UnfinishedStore, UnusableDataDir
from field_client.unlock import DamagedKeyFile, KeyFile, new_key_file
from tests.conftest import PASSPHRASE, sample_record
from tests.conftest import run_cli as run


def make_store(path: Path) -> Path:
    Store.init(path, PASSPHRASE, site="ras-jedir", operator="Amina", kdf_memory_kib=1024).close()
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_store(tmp_path / "dev")


def digest_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def one_line_error(result: object, *needles: str) -> None:
    assert result.returncode == 2, result.stderr  # type: ignore[attr-defined]
    stderr = result.stderr.strip()  # type: ignore[attr-defined]
    assert stderr.startswith("error: ") and "\n" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_init_on_a_regular_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    result = run(afile, "init", "--site", "s1", "--operator", "o")
    one_line_error(result, f"{afile} is a file, not a directory")
    assert afile.read_text() == "keep me"


def test_init_below_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    result = run(tmp_path / "afile" / "sub", "init", "--site", "s1", "--operator", "o")
    one_line_error(result, "cannot make a store in", "not a directory")


def test_init_where_it_may_not_write(tmp_path: Path) -> None:
    target = Path("/sys/fieldreg-test-store")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("this machine lets us create directories in /sys")
    with pytest.raises(UnusableDataDir, match="cannot make a store in /sys/fieldreg-test-store"):
        Store.init(target, PASSPHRASE, site="s1", operator="o", kdf_memory_kib=1024)
    result = run(target, "init", "--site", "s1", "--operator", "o")
    one_line_error(result, "cannot make a store in")


@pytest.mark.parametrize(
    "text",
    ["[]", "null", '"store"', "{}", "not json", '{"format": "fieldreg-store-key/1"}'],
)
def test_damaged_key_file_is_named(home: Path, text: str) -> None:
    (home / "store.key").write_text(text)
    with pytest.raises(DamagedKeyFile, match="not a fieldreg key file"):
        Store.open(home, PASSPHRASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_kib", 1 << 40), ("iterations", 10**9), ("lanes", 0), ("salt", "AAAA")],
)
def test_key_file_asking_the_impossible_is_damaged(home: Path, field: str, value: object) -> None:
    data = json.loads((home / "store.key").read_text())
    data[field] = value
    (home / "store.key").write_text(json.dumps(data))
    with pytest.raises(DamagedKeyFile, match="not a fieldreg key file"):
        KeyFile.load(home / "store.key")


def test_status_with_a_key_file_that_is_a_list(home: Path) -> None:
    (home / "store.key").write_text("[]")
    one_line_error(run(home, "status"), "store.key: not a fieldreg key file")
    one_line_error(
        run(home, "passphrase", env={"FIELDREG_NEW_PASSPHRASE": "another set of four words"}),
        "store.key: not a fieldreg key file",
    )


def test_missing_database_is_not_created(home: Path) -> None:
    (home / "store.db").unlink()
    for name in ("store.db-wal", "store.db-shm"):
        (home / name).unlink(missing_ok=True)
    one_line_error(run(home, "status"), "store.db is missing")
    assert sorted(p.name for p in home.iterdir()) == ["store.key"]
    with pytest.raises(FileNotFoundError, match=r"store\.db is missing"):
        Store.open(home, PASSPHRASE)
    assert sorted(p.name for p in home.iterdir()) == ["store.key"]


def test_empty_database_is_refused_and_left_empty(home: Path) -> None:
    for name in ("store.db-wal", "store.db-shm"):
        (home / name).unlink(missing_ok=True)
    (home / "store.db").write_bytes(b"")
    one_line_error(run(home, "list"), "store.db is empty")
    assert (home / "store.db").read_bytes() == b""
    assert sorted(p.name for p in home.iterdir()) == ["store.db", "store.key"]


def test_database_of_random_bytes(home: Path) -> None:
    (home / "store.db").write_bytes(bytes(range(256)) * 64)
    before = digest_dir(home)
    one_line_error(run(home, "status"), "store.db: the key does not open this store")
    assert digest_dir(home) == before


def test_database_of_another_store(home: Path, tmp_path: Path) -> None:
    other = make_store(tmp_path / "other")
    (home / "store.db").write_bytes((other / "store.db").read_bytes())
    for name in ("store.db-wal", "store.db-shm"):
        (home / name).unlink(missing_ok=True)
    before = digest_dir(home)
    one_line_error(run(home, "list"), "the key does not open this store")
    new = {"FIELDREG_NEW_PASSPHRASE": "another set of four words"}
    one_line_error(run(home, "passphrase", env=new), "the key does not open this store")
    assert digest_dir(home) == before
    with pytest.raises(db.DatabaseLocked):
        Store.open(home, PASSPHRASE)


def test_store_whose_init_stopped_part_way(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    home.mkdir()
    key = b"k" * 32
    new_key_file(PASSPHRASE, key, memory_kib=1024).save(home / "store.key")
    db.connect_engine(home / "store.db", key, create=True).dispose()  # tables, no identity
    with pytest.raises(UnfinishedStore, match="never finished"):
        Store.open(home, PASSPHRASE)
    one_line_error(run(home, "status"), "never finished", "fieldreg init")


def test_no_store_is_said_before_asking_for_a_passphrase(tmp_path: Path) -> None:
    for command in ("status", "passphrase"):
        result = run(tmp_path / "nowhere", command, env={"FIELDREG_PASSPHRASE": ""})
        one_line_error(result, "no store in", "fieldreg init")
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(NoStore):
        Store.check_present(tmp_path / "nowhere")


def test_a_damaged_page_is_one_line_that_shows_no_one(home: Path) -> None:
    record = json.dumps(sample_record())
    for _ in range(3):
        assert run(home, "register", "--json", "-", input=record).returncode == 0
    with Store.open(home, PASSPHRASE) as store, store._engine.connect() as conn:
        page = int(
            conn.exec_driver_sql(
                "SELECT rootpage FROM sqlite_master WHERE name = 'changes'"
            ).scalar_one()
        )
        size = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
    assert not (home / "store.db-wal").exists()  # all of it is in store.db
    with (home / "store.db").open("r+b") as file:  # the key opens the store, one page is wrong
        file.seek((page - 1) * size + 200)
        file.write(b"\x5a" * 100)
    # The failing INSERT's parameters are the person: SQLAlchemy's message shows them.
    for result in (run(home, "register", "--json", "-", input=record), run(home, "status")):
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            "error: the store is damaged (database disk image is malformed):"
            " restore it from a backup\n"
        )
        for secret in ("Mohamed", "Abdel Rahman", "A1234567", "INSERT", "SELECT"):
            assert secret not in result.stdout + result.stderr
