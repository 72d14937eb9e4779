"""The sync side of the device store: enrolment, the outbox position, the hub's
verdicts on this device's edits, and edits pulled from the hub.

All SQL that sync needs lives here and in the two modules this one drives:
`field_client.outbox` (reading the outbox into edits) and
`field_client.pull_store` (merging a pulled page). `field_client.sync_runner`
decides and calls, and runs none. A `SyncStore` shares its `Store`'s
connection and HLC clock (one clock per device: a stamp observed while
pulling must bound the next local edit). Every method is one transaction.

The pushed mark (`pushed_seq`) advances only on the hub's answer: `mark_pushed`
after an acknowledgement (never lowering it), `reset_pushed` when the hub says
where it stands (`batch.gap`, `envelope.replayed`), `lower_pushed` when a pull
page says the hub holds less than the mark (a hub restored from a backup).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from field_client import db
from field_client.outbox import read_edits
from field_client.pull_store import PullResult, merge_page, release_own
from sync.hlc import Clock
from sync.keys import KeyPairs, PublicKeys
from sync.protocol import Edit, PushBatch, Released, cut_batch

__all__ = [
    "AlreadyEnrolled",
    "CannotEnrolAgain",
    "Enrolment",
    "HubAheadOfStore",
    "PullPosition",
    "PullResult",
    "SyncStatus",
    "SyncStore",
]

_OUTBOX_CHUNK_ROWS = 250  # a batch reads at most this many rows past its end
_LOST_OUTCOMES = ("superseded", "conflict")


class AlreadyEnrolled(RuntimeError):
    """The store is enrolled with a hub already; enrolment is once per store."""


class CannotEnrolAgain(RuntimeError):
    """Enrolling again needs an enrolled store the hub has not revoked."""


def _refuse_renewal(meta: Mapping[str, str]) -> None:
    if "device_keys" not in meta:
        raise CannotEnrolAgain("this store was never enrolled: use fieldreg enrol")
    if "revoked_at" in meta:
        raise CannotEnrolAgain(
            "the hub revoked this device and ordered it wiped; it cannot enrol again"
        )


class HubAheadOfStore(ValueError):
    """The hub claims more of this device's changes than this store ever made.

    Happens when a store is restored from an old backup: new changes would
    reuse sequence numbers the hub has applied, so sync must stop.
    """


@dataclass(frozen=True, eq=False)
class Enrolment:
    """What enrolment pins: the hub (URL, public keys, epoch, sites) and this device's keys."""

    hub_url: str
    keys: KeyPairs = field(repr=False)
    hub_keys: PublicKeys
    sites: tuple[str, ...]
    epoch: str
    enrolled_at_ms: int

    @property
    def hub_fingerprint(self) -> str:
        return self.hub_keys.fingerprint()


@dataclass(frozen=True)
class PullPosition:
    """Where the next pull starts: the hub's opaque cursor ("" for the start) and epoch."""

    cursor: str
    epoch: str


@dataclass(frozen=True)
class SyncStatus:
    hub_url: str | None
    hub_fingerprint: str | None
    sites: tuple[str, ...]
    pushed_seq: int
    last_seq: int
    last_sync_at_ms: int | None
    lost_edits: int  # own edits the hub answered superseded or conflict
    quarantined: int  # own edits the hub quarantined
    is_revoked: bool

    @property
    def is_enrolled(self) -> bool:
        return self.hub_url is not None

    @property
    def pending(self) -> int:
        return self.last_seq - self.pushed_seq


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class SyncStore:
    """Sync state and pulled data, over the `Store`'s connection and clock."""

    def __init__(
        self, conn: sa.Connection, clock: Clock, *, device_id: str, wall_ms: Callable[[], int]
    ) -> None:
        self._conn = conn
        self._clock = clock
        self._device_id = device_id
        self._wall_ms = wall_ms

    # -- meta ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        rows = self._conn.execute(sa.select(db.meta.c.key, db.meta.c.value)).all()
        return {k: v for k, v in rows}

    def _put_meta(self, values: Mapping[str, str]) -> None:
        stmt = sqlite_insert(db.meta)
        stmt = stmt.on_conflict_do_update(
            index_elements=[db.meta.c.key], set_={"value": stmt.excluded.value}
        )
        self._conn.execute(stmt, [{"key": k, "value": v} for k, v in values.items()])

    # -- enrolment -------------------------------------------------------------------------
    def read_enrolment(self) -> Enrolment | None:
        """The pinned hub and this device's keys, or None before enrolment."""
        with self._conn.begin():
            meta = self._meta()
        if "device_keys" not in meta:
            return None
        return Enrolment(
            hub_url=meta["hub_url"],
            keys=KeyPairs.from_bytes(base64.b64decode(meta["device_keys"])),
            hub_keys=PublicKeys.from_json(json.loads(meta["hub_public_keys"])),
            sites=tuple(json.loads(meta["sites"])),
            epoch=meta["hub_epoch"],
            enrolled_at_ms=int(meta["enrolled_at"]),
        )

    def enrolment_keys(self) -> KeyPairs:
        """The key pairs to enrol with: those a first try made and kept, else new
        ones, kept here before they are sent. If the hub's answer is lost, the
        hub enrolled these keys: the next try must present the same ones."""
        with self._conn.begin():
            kept = self._meta().get("pending_device_keys")
            if kept:
                return KeyPairs.from_bytes(base64.b64decode(kept))
            keys = KeyPairs.generate()
            self._put_meta(
                {"pending_device_keys": base64.b64encode(keys.to_bytes()).decode("ascii")}
            )
        return keys

    def save_enrolment(self, enrolment: Enrolment) -> None:
        """Store the enrolment in one transaction; `AlreadyEnrolled` (nothing written) if any.

        The private keys go into this (encrypted) database only. The pull
        cursor starts at the beginning of the hub's epoch.
        """
        with self._conn.begin():
            if "device_keys" in self._meta():
                raise AlreadyEnrolled("this store is enrolled with a hub already")
            self._conn.execute(sa.delete(db.meta).where(db.meta.c.key == "pending_device_keys"))
            self._put_meta(
                {
                    "device_keys": base64.b64encode(enrolment.keys.to_bytes()).decode("ascii"),
                    "hub_url": enrolment.hub_url,
                    "hub_public_keys": _dumps(enrolment.hub_keys.to_json()),
                    "sites": _dumps(list(enrolment.sites)),
                    "hub_epoch": enrolment.epoch,
                    "pull_cursor": "",
                    "enrolled_at": str(enrolment.enrolled_at_ms),
                }
            )

    def renewable_enrolment(self) -> Enrolment:
        """The enrolment to renew; `CannotEnrolAgain` if never enrolled or revoked."""
        with self._conn.begin():
            _refuse_renewal(self._meta())
        enrolment = self.read_enrolment()
        assert enrolment is not None
        return enrolment

    def renew_enrolment(self, *, sites: tuple[str, ...], epoch: str, enrolled_at_ms: int) -> None:
        """Record that the hub enrolled this device again (a hub restored from a
        backup older than the first enrolment): same keys, same pinned hub; the
        pull starts over in the hub's epoch (merging what is here changes nothing)."""
        with self._conn.begin():
            _refuse_renewal(self._meta())
            self._put_meta(
                {
                    "sites": _dumps(list(sites)),
                    "hub_epoch": epoch,
                    "pull_cursor": "",
                    "enrolled_at": str(enrolled_at_ms),
                }
            )

    def mark_revoked(self) -> None:
        """Record that the hub revoked this device (and ordered a wipe). Deletes nothing."""
        with self._conn.begin():
            self._put_meta({"revoked_at": str(self._wall_ms())})

    def is_revoked(self) -> bool:
        """Whether the hub revoked this device (`mark_revoked`): `status().is_revoked`
        without counting verdicts over the whole change log."""
        with self._conn.begin():
            return "revoked_at" in self._meta()

    # -- push ------------------------------------------------------------------------------
    def outbox_edits(
        self, max_batch_bytes: int, *, chunk_rows: int = _OUTBOX_CHUNK_ROWS
    ) -> list[Edit]:
        """The next batch to push: whole edits above the pushed mark, in sequence order,
        cut by `sync.protocol.batch_edits` at `max_batch_bytes` ([] when all is pushed).

        The same store and limit give the same batch until the mark moves, so a
        batch re-sent after a lost answer has the same id and content.
        """
        batch = self.outbox_batch(max_batch_bytes, chunk_rows=chunk_rows)
        return [] if batch is None else batch.edits

    def outbox_batch(
        self,
        max_batch_bytes: int,
        *,
        after_seq: int | None = None,
        chunk_rows: int = _OUTBOX_CHUNK_ROWS,
    ) -> PushBatch | None:
        """`outbox_edits` with the body encoded once (None when all is pushed).

        `after_seq` reads the batch that would follow a batch still waiting for
        its answer (it must be at or above the pushed mark); by default the
        batch starts at the mark. Reads only.
        """
        with self._conn.begin():
            pushed = int(self._meta()["pushed_seq"])
            start = pushed if after_seq is None else max(after_seq, pushed)
            with closing(read_edits(self._conn, start, chunk_rows)) as edits:
                return cut_batch(edits, max_batch_bytes)

    def _check_not_ahead(self, seq: int, meta: Mapping[str, str]) -> None:
        if seq > int(meta["device_seq"]):
            raise HubAheadOfStore(
                f"the hub has applied changes up to {seq} from this device, but this store"
                f" made only {meta['device_seq']}: was it restored from an old copy?"
            )

    def mark_pushed(self, high_water: int, verdicts: Mapping[int, str]) -> int:
        """Record the hub's acknowledgement: raise the pushed mark to `high_water`
        (never lower it) and set the outcome of each own change in `verdicts`
        (device seq → 'applied' | 'superseded' | 'conflict' |
        'quarantined:<reason>'). A change at or below the mark with no outcome
        was applied: that is most of them, and writing it on each would make
        the answer to a batch of thousands cost seven times as long to store,
        and the push wait for it.

        Returns the mark. Raises `HubAheadOfStore` (nothing written) if the hub
        claims more than this store made.
        """
        with self._conn.begin():
            meta = self._meta()
            self._check_not_ahead(high_water, meta)
            mark = max(int(meta["pushed_seq"]), high_water)
            if verdicts:
                self._conn.exec_driver_sql(
                    "UPDATE changes SET outcome = ? WHERE device_seq = ?",
                    [(v, s) for s, v in sorted(verdicts.items())],
                )
            self._put_meta({"pushed_seq": str(mark), "last_sync_at": str(self._wall_ms())})
        return mark

    def reset_pushed(self, seq: int) -> None:
        """Set the pushed mark to `seq`, lower or higher, because the hub said so.

        Verdicts above a lowered mark are cleared: they will come again.
        Raises `HubAheadOfStore` (nothing written) past the last change made.
        """
        with self._conn.begin():
            meta = self._meta()
            self._check_not_ahead(seq, meta)
            self._conn.execute(
                sa.update(db.changes).where(db.changes.c.device_seq > seq).values(outcome=None)
            )
            self._put_meta({"pushed_seq": str(max(seq, 0))})

    def lower_pushed(self, high_water: int) -> int:
        """Lower the pushed mark to `high_water`, where the hub says it holds this
        device's changes, when that is below the mark (the hub was restored from
        an older backup); never raise it. Returns how many own changes wait to
        be sent again (0 when the mark stays).

        Their verdicts are cleared: the hub answers them anew.
        """
        with self._conn.begin():
            pushed = int(self._meta()["pushed_seq"])
            seq = max(high_water, 0)
            if seq >= pushed:
                return 0
            self._conn.execute(
                sa.update(db.changes).where(db.changes.c.device_seq > seq).values(outcome=None)
            )
            self._put_meta({"pushed_seq": str(seq)})
        return pushed - seq

    def pushed_seq(self) -> int:
        """The pushed mark: every own change up to it is confirmed by the hub."""
        with self._conn.begin():
            return int(self._meta()["pushed_seq"])

    def pending_count(self) -> int:
        """How many own changes wait above the pushed mark."""
        with self._conn.begin():
            meta = self._meta()
        return int(meta["device_seq"]) - int(meta["pushed_seq"])

    # -- pull ------------------------------------------------------------------------------
    def pull_position(self) -> PullPosition:
        with self._conn.begin():
            meta = self._meta()
        return PullPosition(meta.get("pull_cursor", ""), meta.get("hub_epoch", ""))

    def restart_pull(self, epoch: str) -> None:
        """Pull from the start of hub epoch `epoch` next time (merging is idempotent)."""
        with self._conn.begin():
            self._put_meta({"pull_cursor": "", "hub_epoch": epoch})

    def apply_pull(
        self,
        edits: Sequence[Edit],
        *,
        cursor: str,
        epoch: str,
        released: Sequence[Released] = (),
    ) -> PullResult:
        """Merge a pulled page and store `cursor` and `epoch`, all in one transaction.

        Each field is merged with `sync.merge.merge_field` against the local
        value and version: the higher version becomes current, the other is
        kept in the history (each edit is one `received` row). Documents keep
        fields this schema version does not know. Match keys follow name
        changes; every stamp is observed by the HLC, which is persisted. A
        field already in the history (same record, field and version) is not
        logged twice, so a page pulled again changes nothing (see
        `field_client.pull_store`).

        `released` own edits, which the hub had quarantined as `record.unknown`
        and applied since, take the hub's verdict instead (`release_own`).
        """
        recorded_at = self._iso_now()
        with self._conn.begin():
            result = merge_page(self._conn, self._clock, edits, recorded_at=recorded_at)
            result = replace(result, released=release_own(self._conn, released))
            self._put_meta(
                {
                    "hlc": self._clock.last.encode(),
                    "pull_cursor": cursor,
                    "hub_epoch": epoch,
                    "last_sync_at": str(self._wall_ms()),
                }
            )
        return result

    def _iso_now(self) -> str:
        return datetime.fromtimestamp(self._wall_ms() / 1000, UTC).isoformat(timespec="seconds")

    # -- status ----------------------------------------------------------------------------
    def status(self) -> SyncStatus:
        """Enrolment, the push position, the last contact, and the hub's verdicts so far."""
        c = db.changes.c
        own = sa.select(sa.func.count()).where(c.device_seq.is_not(None))
        with self._conn.begin():
            meta = self._meta()
            lost = self._conn.execute(own.where(c.outcome.in_(_LOST_OUTCOMES))).scalar_one()
            quarantined = self._conn.execute(
                own.where(c.outcome.startswith("quarantined:"))
            ).scalar_one()
        hub_keys = meta.get("hub_public_keys")
        return SyncStatus(
            hub_url=meta.get("hub_url"),
            hub_fingerprint=(
                PublicKeys.from_json(json.loads(hub_keys)).fingerprint() if hub_keys else None
            ),
            sites=tuple(json.loads(meta.get("sites", "[]"))),
            pushed_seq=int(meta["pushed_seq"]),
            last_seq=int(meta["device_seq"]),
            last_sync_at_ms=int(meta["last_sync_at"]) if "last_sync_at" in meta else None,
            lost_edits=lost,
            quarantined=quarantined,
            is_revoked="revoked_at" in meta,
        )
