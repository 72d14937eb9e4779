"""What the push and pull halves of a sync run share: this device as the hub
knows it, opening the hub's answers with the pinned keys, the run's summary
and its errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from field_client.sync_store import Enrolment
from sync.envelope import EnvelopeError, Header, open_sealed
from sync.transport import HubProblem

__all__ = [
    "DeviceRevoked",
    "Link",
    "NotEnrolled",
    "Progress",
    "SyncError",
    "SyncSummary",
    "bad_answer",
    "in_background",
    "open_answer",
]

T = TypeVar("T")


def in_background(name: str, work: Callable[[], T]) -> Future[T]:
    """Run `work` (a talk with the hub: it writes nothing to the store) on a
    daemon thread. Whatever stops the main thread (Ctrl-C, an error) then stops
    the process at once, not after the exchange in flight ends or times out,
    which on a slow link is a minute; that batch or page comes again next time.
    """
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever waits for the answer
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


# progress(phase, done, total): phase "push" (total = changes to send) or
# "pull" (total unknown: None).
Progress = Callable[[str, int, int | None], None]


class SyncError(Exception):
    """Sync cannot go on; `code` is stable and dotted, `detail` a sentence for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class NotEnrolled(SyncError):
    def __init__(self) -> None:
        super().__init__(
            "device.not_enrolled",
            "this device is not enrolled with a hub: run `fieldreg enrol --hub URL --code CODE`",
        )


class DeviceRevoked(SyncError):
    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "device.revoked",
            "the hub has revoked this device and ordered it wiped; nothing was deleted"
            " here: hand the device to your coordinator" + (f" (hub: {detail})" if detail else ""),
        )


@dataclass
class SyncSummary:
    """What one sync run (or a whole watch) did. Counts of changes unless named batches."""

    sent_batches: int = 0
    sent_changes: int = 0
    acknowledged: int = 0  # own changes the hub has confirmed (the mark moved over them)
    duplicates: int = 0  # of those, changes the hub had applied before
    received_edits: int = 0
    conflicts: int = 0  # own changes that opened a conflict at the hub
    superseded: int = 0  # own changes that lost to a later write
    quarantined: int = 0
    released: int = 0  # own changes the hub had quarantined and has applied since

    def add(self, other: SyncSummary) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def has_moved(self) -> bool:
        return bool(self.sent_changes or self.acknowledged or self.received_edits)


def bad_answer(detail: str) -> HubProblem:
    """The hub answered something that is not the protocol."""
    return HubProblem(200, "hub.bad_answer", detail)


@dataclass(frozen=True)
class Link:
    """This device as the hub knows it: its id, its keys, the pinned hub keys."""

    device_id: str
    enrolment: Enrolment


def open_answer(data: bytes, link: Link, *, kind: str) -> tuple[Header, Any]:
    """Open an envelope from the hub with the PINNED keys, check it is for us, and
    return its header and parsed JSON body.

    Raises `SyncError` for an envelope that does not open or is misaddressed,
    and a bad answer (`HubProblem`) for a body that is not JSON.
    """
    try:
        opened = open_sealed(data, sender=link.enrolment.hub_keys, recipient=link.enrolment.keys)
    except EnvelopeError as exc:
        raise SyncError(
            exc.code,
            f"refused the hub's {kind} answer: {exc.detail} (it is not from the hub pinned at"
            " enrolment, or was damaged)",
        ) from None
    header = opened.header
    if (header.kind, header.sender, header.recipient) != (kind, "hub", link.device_id):
        raise SyncError(
            "envelope.misaddressed",
            f"refused an envelope of kind {header.kind!r} from {header.sender!r} to"
            f" {header.recipient!r}: expected {kind!r} from 'hub' to this device",
        )
    try:
        body = json.loads(opened.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad_answer(f"the {kind} body is not JSON") from None
    return header, body
