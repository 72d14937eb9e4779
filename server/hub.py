"""The hub's sync service: enrolment, push and pull, on verified envelopes.

Routes call one method each; every method opens its own short transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from schemas.record import MIN_SCHEMA_VERSION, SCHEMA_VERSION
from server import audit as audit_log
from server import dedup_check, match_profiles, name_index
from server import devices as device_store
from server.db import make_engine
from server.dedup_worker import DuplicateChecker
from server.feed import (
    change_mark,
    cursor_is_held,
    decode_cursor,
    encode_cursor,
    read_page,
    released_for,
)
from server.hub_edits import HUB_DEVICE
from server.ingest import DeviceRevoked, PushContext, apply_parked, apply_push, parked_edits
from server.keystore import HubSecrets
from server.name_index import IndexKey
from server.problems import Problem
from server.settings import HubSettings
from sync.envelope import (
    EnvelopeError,
    Header,
    Opened,
    open_sealed,
    read_header_unverified,
    seal,
)
from sync.hlc import Clock, Stamp, system_ms
from sync.http_signature import SignatureError, read_key_id_unverified, verify_request
from sync.keys import PublicKeys
from sync.protocol import dumps

__all__ = ["HUB_ID", "PULL_PATH", "Hub"]

HUB_ID = HUB_DEVICE  # the sender of the hub's envelopes, as it authors its own edits
PULL_PATH = "/api/v1/sync/pull"
log = logging.getLogger("fieldreg.hub")

_ENVELOPE_STATUS = {
    "envelope.malformed": 400,
    "protocol.unsupported": 400,
    "envelope.bad_signature": 401,
    "envelope.undecryptable": 400,
}


@dataclass(frozen=True)
class EnrolRequest:
    code: str
    device_id: str
    site: str
    public_keys: dict[str, Any]


class Hub:
    """One hub process: its database, secrets, clock and settings."""

    def __init__(
        self,
        settings: HubSettings,
        *,
        wall_ms: Callable[[], int] = system_ms,
        engine: sa.Engine | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = HubSecrets.load(settings.data_dir)
        self.engine = engine or make_engine(
            settings.resolved_database_url(),
            busy_timeout_s=settings.busy_timeout_s,
            mmap_mb=settings.sqlite_mmap_mb,
        )
        self._wall_ms = wall_ms
        with self.engine.begin() as conn:
            epoch = device_store.get_meta(conn, "epoch")
            last = device_store.get_meta(conn, "hlc")
        if epoch is None or last is None:
            raise RuntimeError("the hub database is not initialised: run `fieldreg-hub init`")
        self.epoch = epoch
        self.clock = Clock(
            wall_ms=wall_ms, last=Stamp.decode(last), max_ahead_ms=settings.clock_max_ahead_ms
        )
        self.audit_enabled = True  # benchmarks turn it off to measure what auditing costs
        self.name_index = IndexKey(self.secrets.master_key)
        self.block_index = dedup_check.BlockIndex(self.secrets.master_key)
        self.profiles = match_profiles.ProfileCache(settings.profile_cache)
        self.checker = DuplicateChecker(
            self.engine,
            index=self.block_index,
            master_key=self.secrets.master_key,
            cache=self.profiles,
            now=self.now,
        )

    def audit(
        self,
        conn: sa.Connection,
        *,
        actor: str,
        action: str,
        target: str,
        request_id: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an entry to the hash-chained audit log, in the caller's transaction.

        `detail` holds counts and ids only, never identifying values.
        """
        if self.audit_enabled:
            audit_log.append(
                conn,
                actor=actor,
                action=action,
                target=target,
                request_id=request_id,
                now=self.now(),
                signer=self.secrets.keys,
                detail=detail,
            )

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._wall_ms() / 1000, UTC)

    @property
    def public_keys(self) -> PublicKeys:
        return self.secrets.keys.public()

    def info(self) -> dict[str, Any]:
        return {
            "public_keys": self.public_keys.to_json(),
            "fingerprint": self.public_keys.fingerprint(),
            "epoch": self.epoch,
            "protocol": 1,
        }

    # -- enrolment ---------------------------------------------------------------------
    def enrol(self, request: EnrolRequest, *, request_id: str = "-") -> dict[str, Any]:
        with self.engine.begin() as conn:
            device, is_new = device_store.redeem_code(
                conn,
                code=request.code,
                device_id=request.device_id,
                site=request.site,
                public_keys=request.public_keys,
                now=self.now(),
            )
            self.audit(
                conn,
                actor=f"device:{device.id}",
                action="device.enrol",
                target=f"device:{device.id}",
                request_id=request_id,
                detail={"sites": sorted(device.sites), **({} if is_new else {"again": True})},
            )
        return {"device_id": device.id, "sites": sorted(device.sites), "hub": self.info()}

    def create_enrol_code(
        self,
        sites: list[str],
        valid_for: timedelta,
        *,
        request_id: str,
        actor: str = "cli:admin",
    ) -> str:
        """A one-time enrolment code for `sites`, audited (the code is not)."""
        with self.engine.begin() as conn:
            code = device_store.create_enrol_code(
                conn, sites=sites, valid_for=valid_for, now=self.now()
            )
            self.audit(
                conn,
                actor=actor,
                action="device.enrol_code",
                target=f"sites:{','.join(sorted(sites))}",
                request_id=request_id,
                detail={"valid_for_s": int(valid_for.total_seconds())},
            )
        return code

    # -- push --------------------------------------------------------------------------
    def _known_device(self, device_id: str) -> device_store.DeviceInfo:
        with self.engine.begin() as conn:
            device = device_store.get_device(conn, device_id)
        if device is None:
            raise Problem(401, "device.unknown", "this device is not enrolled at this hub")
        return device

    def _revoked(self, device: device_store.DeviceInfo) -> Problem:
        return Problem(
            403,
            "device.revoked",
            "this device was revoked: stop using it and wipe its store",
            action="wipe",
        )

    def push(self, envelope: bytes, *, request_id: str = "-") -> bytes:
        """Verify, open and apply a push envelope; return the sealed acknowledgement."""
        with self.checker.push_arriving():  # the background duplicate check waits
            return self._push(envelope, request_id)

    def _push(self, envelope: bytes, request_id: str) -> bytes:
        try:
            header = read_header_unverified(envelope)
        except EnvelopeError as exc:
            raise Problem(_ENVELOPE_STATUS[exc.code], exc.code, exc.detail) from None
        device = self._known_device(header.sender)
        try:
            opened = open_sealed(envelope, sender=device.public_keys, recipient=self.secrets.keys)
        except EnvelopeError as exc:
            raise Problem(_ENVELOPE_STATUS[exc.code], exc.code, exc.detail) from None
        header = opened.header
        if header.kind != "push" or header.recipient != HUB_ID:
            raise Problem(
                400, "envelope.malformed", "expected a push envelope addressed to the hub"
            )
        if not MIN_SCHEMA_VERSION <= header.schema_version <= SCHEMA_VERSION:
            update = "the hub" if header.schema_version > SCHEMA_VERSION else "fieldreg"
            raise Problem(
                400,
                "protocol.unsupported",
                f"this hub accepts schema versions {MIN_SCHEMA_VERSION} to {SCHEMA_VERSION},"
                f" not {header.schema_version}: update {update}",
            )
        now = self.now()
        if device.is_revoked:
            raise self._keep_revoked(device, header, envelope, now)
        ctx = self._context(device, opened, envelope, now)
        try:
            with self.engine.begin() as conn:
                ack = apply_push(conn, ctx)
                if not ack["duplicate"]:
                    self._release_parked(conn, ctx, request_id)
                    self._after_ingest(conn, ctx)
                self.audit(
                    conn,
                    actor=f"device:{device.id}",
                    action="sync.push",
                    target=f"batch:{header.batch_id}",
                    request_id=request_id,
                    detail={
                        "seq": [header.seq_first, header.seq_last],
                        "duplicate": ack["duplicate"],
                        "conflicts": len(ack["conflicts"]),
                        "quarantined": len(ack["quarantined"]),
                    },
                )
        except DeviceRevoked:  # while the push waited for the write lock
            raise self._keep_revoked(device, header, envelope, now) from None
        self.checker.wake()
        return self._seal_to(device, "ack", header.batch_id, header.seq_first, header.seq_last, ack)

    def _keep_revoked(
        self, device: device_store.DeviceInfo, header: Header, envelope: bytes, now: datetime
    ) -> Problem:
        """Quarantine a batch a revoked device sent; return the problem to answer."""
        with self.engine.begin() as conn:
            device_store.quarantine_envelope(
                conn,
                device_id=device.id,
                batch_id=header.batch_id,
                reason="device.revoked",
                detail=f"sequence {header.seq_first}-{header.seq_last} sent after revocation",
                envelope=envelope,
                now=now,
            )
        return self._revoked(device)

    def _context(
        self, device: device_store.DeviceInfo, opened: Opened, envelope: bytes, now: datetime
    ) -> PushContext:
        """What `apply_push` needs of one opened push envelope from `device`."""
        return PushContext(
            device_id=device.id,
            sites=device.sites,
            header=opened.header,
            body=opened.body,
            digest=opened.body_sha256,
            envelope=envelope,
            master_key=self.secrets.master_key,
            clock=self.clock,
            now=now,
            hub_now_ms=self._wall_ms(),
            refuse_ahead_ms=self.settings.clock_refuse_ahead_ms,
            epoch=self.epoch,
        )

    def _release_parked(self, conn: sa.Connection, ctx: PushContext, request_id: str) -> None:
        # Edits another device sent for these records before they were registered
        # here (a restored hub hears devices in any order) were kept in
        # quarantine as record.unknown; now that the records exist, apply them as
        # their device sent them. A device revoked since stays quarantined.
        seen: set[tuple[str, str | None, str]] = set()
        for row in parked_edits(conn, ctx.created):
            if (row.device_id, row.batch_id, row.record_id) in seen:
                continue  # one row per edit; the first applies all of the batch's
            seen.add((row.device_id, row.batch_id, row.record_id))
            device = device_store.get_device(conn, row.device_id)
            if device is None or device.is_revoked:
                continue
            try:
                opened = open_sealed(
                    row.payload, sender=device.public_keys, recipient=self.secrets.keys
                )
            except EnvelopeError:
                continue  # the device's keys changed since: leave it for a person
            parked = self._context(device, opened, row.payload, self.now())
            if apply_parked(conn, parked, row.record_id):
                ctx.renamed.update(parked.renamed)  # the name index and duplicate
                ctx.touched.update(parked.touched)  # check take them too
                self.audit(
                    conn,
                    actor=f"device:{device.id}",
                    action="quarantine.release",
                    target=f"record:{row.record_id}",
                    request_id=request_id,
                    detail={"batch": opened.header.batch_id},
                )

    def _after_ingest(self, conn: sa.Connection, ctx: PushContext) -> None:
        # In the push's own transaction: records whose names an edit touched get
        # their blind name-index entries anew, and every record the batch
        # changed is queued for the duplicate check, which runs after the push
        # has answered (`DuplicateChecker`): a device on a poor link waits for
        # the merge, not for the scoring.
        if ctx.renamed:
            values = {
                rid: {p: rec.value(p) for p in name_index.NAME_PATHS}
                for rid, rec in ctx.renamed.items()
            }
            new = {rid for rid, rec in ctx.renamed.items() if rec.is_new}
            name_index.reindex(conn, self.name_index, values, new=new)
        dedup_check.queue_records(conn, ctx.touched, now=self.now(), new=set(ctx.created))

    def _seal_to(
        self,
        device: device_store.DeviceInfo,
        kind: str,
        batch_id: str,
        first: int,
        last: int,
        body: Any,
    ) -> bytes:
        header = Header(
            protocol=1,
            schema_version=SCHEMA_VERSION,
            kind=kind,
            sender=HUB_ID,
            recipient=device.id,
            batch_id=batch_id,
            seq_first=first,
            seq_last=last,
            sent_at_ms=self._wall_ms(),
            kem=device.public_keys.kem_algorithm.value,
        )
        return seal(header, dumps(body), recipient=device.public_keys, sender=self.secrets.keys)

    # -- pull --------------------------------------------------------------------------
    def pull(
        self,
        *,
        raw_query: str,
        headers: Mapping[str, str],
        cursor: str,
        limit: int,
        request_id: str = "-",
    ) -> bytes:
        """A sealed page of edits after `cursor` for the signing device's sites."""
        try:
            device_id = read_key_id_unverified(headers)
        except SignatureError as exc:
            raise Problem(401, exc.code, exc.detail) from None
        device = self._known_device(device_id)
        try:
            verify_request(
                method="GET",
                path=PULL_PATH,
                query=raw_query,
                headers=headers,
                public_key=device.public_keys.signing_public_key(),
            )
        except SignatureError as exc:
            raise Problem(401, exc.code, exc.detail) from None
        if device.is_revoked:
            raise self._revoked(device)
        position = decode_cursor(cursor, self.epoch)
        after = position.seq
        with self.engine.begin() as conn:
            if not cursor_is_held(conn, position):
                # The device has seen changes this hub does not hold: it was
                # restored from an older backup. Start over; merging is idempotent.
                log.warning(
                    "device %s pulled with a cursor past what this hub holds: was the"
                    " database restored from an older backup? run `fieldreg-hub restored`",
                    device.id,
                )
                raise Problem(
                    400,
                    "cursor.invalid",
                    "the cursor is ahead of this hub (restored from a backup?): pull again",
                    epoch=self.epoch,
                )
            edits, covered, more = read_page(
                conn,
                device_id=device.id,
                sites=device.sites,
                after_seq=after,
                max_edits=min(limit, self.settings.pull_page_edits),
                max_bytes=self.settings.pull_page_bytes,
                master_key=self.secrets.master_key,
            )
            if edits:
                self.audit(
                    conn,
                    actor=f"device:{device.id}",
                    action="sync.pull",
                    target=f"hub_seq:{after}-{covered}",
                    request_id=request_id,
                    detail={"edits": len(edits)},
                )
            # After the audit entry: it takes the write lock, and a push takes the
            # write lock before the device row; the other order could deadlock.
            device_store.touch(conn, device.id, now=self.now())
            next_cursor = encode_cursor(self.epoch, covered, change_mark(conn, covered))
            freed = released_for(conn, device.id, after, covered)
        body: dict[str, Any] = {
            "edits": [e.to_json() for e in edits],
            "cursor": next_cursor,
            "more": more,
            "epoch": self.epoch,
            # How far this hub holds the device's own changes: after a restore
            # from an older backup the device sends again what is above it.
            "high_water": device.high_water,
        }
        if freed:  # the device's own edits parked as record.unknown, applied since
            body["released"] = freed
        return self._seal_to(device, "pull", f"pull-{after}", after, covered, body)


def parse_enrol(data: Mapping[str, Any]) -> EnrolRequest:
    """Turn the enrolment JSON into a request (keys are judged after the code)."""
    return EnrolRequest(
        code=data["code"],
        device_id=data["device_id"],
        site=data["site"],
        public_keys=dict(data["public_keys"]),
    )
