"""Enrolment: a device makes its key pairs, presents a one-time code, pins the hub.

The hub's public keys are learnt here, once, and pinned: every envelope from
the hub is verified against them for the life of the store. The keys are read
from `GET /api/v1/hub` first, so a wrong expected fingerprint (or a hub
speaking another protocol) is refused before the one-time code is spent; the
enrolment answer must then name the very same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from field_client.store import Store
from field_client.sync_store import AlreadyEnrolled, CannotEnrolAgain, Enrolment
from sync.envelope import PROTOCOL_VERSION
from sync.hlc import system_ms
from sync.keys import KeyFormatError, KeyPairs, PublicKeys
from sync.transport import HubClient, HubProblem

__all__ = [
    "AlreadyEnrolled",
    "CannotEnrolAgain",
    "EnrolmentRefused",
    "EnrolmentResult",
    "enrol",
    "enrol_again",
    "same_fingerprint",
]


class EnrolmentRefused(Exception):
    """The device refused the hub (fingerprint, protocol or answer); nothing was stored."""


@dataclass(frozen=True)
class EnrolmentResult:
    hub_fingerprint: str
    sites: tuple[str, ...]
    epoch: str


def same_fingerprint(expected: str, actual: str) -> bool:
    """Compare fingerprints as people type them: case, spaces and colons ignored."""

    def norm(text: str) -> str:
        return "".join(ch for ch in text.upper() if ch not in " :-")

    return norm(expected) == norm(actual)


def _hub_keys(answer: Any, where: str) -> PublicKeys:
    keys = answer.get("public_keys") if isinstance(answer, dict) else None
    try:
        hub_keys = PublicKeys.from_json(keys)
    except KeyFormatError as exc:
        raise HubProblem(200, "hub.bad_answer", f"{where}: public_keys: {exc}") from None
    claimed = answer.get("fingerprint")
    if not isinstance(claimed, str) or not same_fingerprint(claimed, hub_keys.fingerprint()):
        raise HubProblem(200, "hub.bad_answer", f"{where}: fingerprint does not match its keys")
    return hub_keys


def _text(answer: dict[str, Any], key: str, where: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise HubProblem(200, "hub.bad_answer", f"{where}: {key}: expected a non-empty string")
    return value


def _hub_of(client: HubClient) -> PublicKeys:
    """The hub's public keys from its info, once its protocol is this device's."""
    info = client.hub_info()
    if info.get("protocol") != PROTOCOL_VERSION:
        raise EnrolmentRefused(
            f"the hub speaks protocol {info.get('protocol')!r}; this device speaks"
            f" {PROTOCOL_VERSION}"
        )
    return _hub_keys(info, "hub info")


def _enrolled(
    store: Store, client: HubClient, code: str, keys: KeyPairs, hub_keys: PublicKeys
) -> tuple[tuple[str, ...], str]:
    """Post the enrolment with `keys` and check the answer: (sites, hub epoch)."""
    answer = client.enrol(
        {
            "code": code,
            "device_id": store.device_id,
            "site": store.site,
            "public_keys": keys.public().to_json(),
        }
    )
    hub = answer.get("hub")
    if _hub_keys(hub, "enrolment answer: hub") != hub_keys:
        raise EnrolmentRefused(
            "the hub's keys changed during enrolment; nothing was stored (ask the hub"
            " operator: the code may be spent)"
        )
    assert isinstance(hub, dict)
    epoch = _text(hub, "epoch", "enrolment answer: hub")
    if answer.get("device_id") != store.device_id:
        raise HubProblem(200, "hub.bad_answer", "enrolment answer: device_id is not this device")
    sites = answer.get("sites")
    if not (isinstance(sites, list) and all(isinstance(s, str) and s for s in sites)):
        raise HubProblem(200, "hub.bad_answer", "enrolment answer: sites: expected site codes")
    if store.site not in sites:
        raise HubProblem(
            200, "hub.bad_answer", f"enrolment answer: sites {sites} lack this store's site"
        )
    return tuple(sites), epoch


def enrol(
    store: Store,
    client: HubClient,
    *,
    code: str,
    expect_fingerprint: str | None = None,
    wall_ms: Callable[[], int] = system_ms,
) -> EnrolmentResult:
    """Enrol `store` with the hub behind `client` using a one-time `code`.

    Makes this device's key pairs (or takes those an earlier try made and
    kept: its answer may have been lost after the hub enrolled them), checks the hub (protocol, and
    `expect_fingerprint` when given) before spending the code, posts the
    enrolment and checks the answer; then stores keys, hub keys, URL, sites
    and epoch in one transaction. Returns the hub fingerprint and sites.

    Raises `AlreadyEnrolled` or `EnrolmentRefused` (nothing stored, nothing
    sent), `HubProblem` (the hub refused, or answered outside the protocol)
    or `HubUnreachable`. Stores nothing unless everything checked out.
    """
    if store.sync.read_enrolment() is not None:
        raise AlreadyEnrolled("this store is enrolled with a hub already")
    hub_keys = _hub_of(client)
    fingerprint = hub_keys.fingerprint()
    if expect_fingerprint is not None and not same_fingerprint(expect_fingerprint, fingerprint):
        raise EnrolmentRefused(
            f"the hub's fingerprint is {fingerprint}, not the expected {expect_fingerprint};"
            " the code was not used and nothing was stored"
        )
    keys = store.sync.enrolment_keys()
    sites, epoch = _enrolled(store, client, code, keys, hub_keys)
    store.sync.save_enrolment(
        Enrolment(
            hub_url=client.base_url,
            keys=keys,
            hub_keys=hub_keys,
            sites=sites,
            epoch=epoch,
            enrolled_at_ms=wall_ms(),
        )
    )
    return EnrolmentResult(hub_fingerprint=fingerprint, sites=sites, epoch=epoch)


def enrol_again(
    store: Store, client: HubClient, *, code: str, wall_ms: Callable[[], int] = system_ms
) -> EnrolmentResult:
    """Enrol an enrolled store again with its pinned hub, keeping its id and keys.

    For a hub restored from a backup older than this device's enrolment: the
    hub no longer knows the device (`device.unknown`), though the device holds
    registrations it must send. Only the very hub pinned at enrolment (same
    keys) is accepted, so a store can never be moved to another hub; a hub
    that still knows the device refuses with `device.exists`. The next sync
    pulls the hub's epoch from the start and sends again whatever the hub
    lacks (it reports how far it holds this device's changes).

    Raises `CannotEnrolAgain` or `EnrolmentRefused` (nothing sent), `HubProblem`
    or `HubUnreachable`; stores nothing unless everything checked out.
    """
    enrolment = store.sync.renewable_enrolment()
    hub_keys = _hub_of(client)
    if hub_keys != enrolment.hub_keys:
        raise EnrolmentRefused(
            f"this store is pinned to the hub with fingerprint {enrolment.hub_fingerprint};"
            f" the hub at {client.base_url} has {hub_keys.fingerprint()}: a store cannot move"
            " to another hub (the code was not used)"
        )
    sites, epoch = _enrolled(store, client, code, enrolment.keys, hub_keys)
    store.sync.renew_enrolment(sites=sites, epoch=epoch, enrolled_at_ms=wall_ms())
    return EnrolmentResult(hub_fingerprint=hub_keys.fingerprint(), sites=sites, epoch=epoch)
