"""Envelope fuzzing against a live hub: a thousand seeded mutations of one valid
push envelope are each refused with a clean problem, nothing is stored, and the
original is still accepted afterwards; replays and re-signed envelopes are refused."""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from server.hub import Hub
from sync.envelope import Header, open_sealed
from tests.hubkit import (
    HandDevice,
    database_backends,
    fresh_database,
    init_hub,
    live_hub,
)

MUTATIONS = 1000
SEED = 20261207
SIGNATURE_BYTES = 64
# What the push route may answer to bytes that are not a valid envelope of an enrolled device.
REFUSALS = {
    "envelope.malformed": 400,
    "protocol.unsupported": 400,
    "envelope.undecryptable": 400,
    "envelope.bad_signature": 401,
    "device.unknown": 401,
}
TABLES = ("records", "changes", "batches", "conflicts", "quarantine")

Region = tuple[int, int]


@pytest.fixture(params=database_backends())
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[httpx.Client, Hub]]:
    with (
        fresh_database(request.param) as url,
        live_hub(init_hub(tmp_path / "hub", url)) as (base, live),
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        yield http, live


def counts(hub: Hub) -> dict[str, int]:
    with hub.engine.connect() as conn:
        return {
            t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES
        }


def regions(envelope: bytes) -> dict[str, Region]:
    """Byte ranges of an envelope: framing, header, ciphertext, signature."""
    (header_len,) = struct.unpack_from(">I", envelope, 5)
    header_end = 9 + header_len
    return {
        "framing": (0, 9),
        "header": (9, header_end),
        "ciphertext": (header_end + 4, len(envelope) - SIGNATURE_BYTES),
        "signature": (len(envelope) - SIGNATURE_BYTES, len(envelope)),
    }


def _flip(data: bytearray, rng: random.Random, lo: int, hi: int) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(lo, hi)
        data[at] ^= 1 << rng.randrange(8)
    return "bit flip"


def _replace(data: bytearray, rng: random.Random, lo: int, hi: int) -> str:
    at = rng.randrange(lo, hi)
    data[at] = rng.choice([b for b in range(256) if b != data[at]])
    return f"replace byte {at}"


def _insert(data: bytearray, rng: random.Random, lo: int, hi: int) -> str:
    at = rng.randrange(lo, hi + 1)
    data[at:at] = rng.randbytes(rng.randint(1, 16))
    return f"insert at {at}"


def _delete(data: bytearray, rng: random.Random, lo: int, hi: int) -> str:
    at = rng.randrange(lo, hi)
    del data[at : min(hi, at + rng.randint(1, 16))]
    return f"delete at {at}"


def _truncate(data: bytearray, rng: random.Random, lo: int, hi: int) -> str:
    at = rng.randrange(lo, hi)
    del data[at:]
    return f"truncate at {at}"


def _duplicate(data: bytearray, rng: random.Random, lo: int, hi: int) -> str:
    start = rng.randrange(lo, hi)
    end = min(hi, start + rng.randint(1, 64))
    data[end:end] = data[start:end]
    return f"duplicate {start}-{end}"


MUTATORS: list[Callable[[bytearray, random.Random, int, int], str]] = [
    _flip,
    _replace,
    _insert,
    _delete,
    _truncate,
    _duplicate,
]


def mutate(original: bytes, spans: dict[str, Region], rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of `original` inside one region; never the original itself."""
    while True:
        name = rng.choices(list(spans), weights=[1, 3, 3, 3])[0]
        lo, hi = spans[name]
        data = bytearray(original)
        how = rng.choice(MUTATORS)(data, rng, lo, hi)
        if bytes(data) != original:
            return bytes(data), f"{name}: {how}"


def assert_refused(answer: httpx.Response, how: str) -> str:
    assert answer.status_code < 500, f"{how}: server error {answer.text}"
    assert answer.headers["content-type"] == "application/problem+json", how
    body = answer.json()
    assert body["code"] in REFUSALS, f"{how}: {body}"
    assert answer.status_code == body["status"] == REFUSALS[body["code"]], f"{how}: {body}"
    assert "Traceback" not in answer.text
    return str(body["code"])


def test_a_thousand_mutated_envelopes_are_refused_and_store_nothing(
    hub: tuple[httpx.Client, Hub],
) -> None:
    http, live = hub
    device = HandDevice.enrol(http, live, "ras-jedir")
    original = device.envelope([device.new_record("Amina"), device.new_record("Omar")])
    spans = regions(original)
    rng = random.Random(SEED)
    codes: Counter[str] = Counter()
    where: Counter[str] = Counter()
    for _ in range(MUTATIONS):
        mutated, how = mutate(original, spans, rng)
        codes[assert_refused(device.push(mutated), how)] += 1
        where[how.split(":")[0]] += 1
    assert counts(live) == dict.fromkeys(TABLES, 0)
    # Every region was hit, and the refusals were more than one kind.
    assert min(where.values()) >= MUTATIONS // 20, where
    assert {"envelope.malformed", "envelope.bad_signature"} <= set(codes), codes
    answer = device.push(original)
    ack = device.open_answer(answer)
    assert ack["duplicate"] is False and ack["high_water"] == device.seq
    assert counts(live)["records"] == 2


def _resign(envelope: bytes, header: bytes, signer: HandDevice) -> bytes:
    """`envelope`'s ciphertext under `header`, signed by `signer` (as `seal` signs)."""
    spans = regions(envelope)
    ciphertext = envelope[slice(*spans["ciphertext"])]
    message = b"fieldreg/envelope/v1\x00" + struct.pack(">I", len(header)) + header + ciphertext
    signature = signer.keys.signing.sign(message)
    return (
        envelope[:5]
        + struct.pack(">I", len(header))
        + header
        + struct.pack(">I", len(ciphertext))
        + ciphertext
        + signature
    )


def test_replays_and_batches_re_signed_by_another_device_are_refused(
    hub: tuple[httpx.Client, Hub],
) -> None:
    http, live = hub
    a = HandDevice.enrol(http, live, "ras-jedir")
    b = HandDevice.enrol(http, live, "ras-jedir")
    edits = [a.new_record("Amina")]
    envelope = a.envelope(edits)
    header = envelope[slice(*regions(envelope)["header"])]

    # B signs A's header and ciphertext: the hub checks A's key, which did not sign.
    forged = _resign(envelope, header, b)
    assert assert_refused(b.push(forged), "B signs as A") == "envelope.bad_signature"
    # B claims the batch as its own: the header is bound to the ciphertext (HPKE info).
    as_b = json.loads(header)
    as_b["sender"] = b.id
    claimed = json.dumps(as_b, sort_keys=True, separators=(",", ":")).encode()
    stolen = _resign(envelope, claimed, b)
    assert assert_refused(b.push(stolen), "B claims A's batch") == "envelope.undecryptable"
    assert counts(live) == dict.fromkeys(TABLES, 0)

    first = a.open_answer(a.push(envelope))
    assert first["duplicate"] is False
    before = counts(live)
    # The same bytes again: the stored acknowledgement, sealed to A; nothing applied twice.
    replay = a.open_answer(a.push(envelope))
    assert replay["duplicate"] is True and replay["high_water"] == first["high_water"]
    # The same edits under a new batch id: refused, with the hub's position.
    renamed = a.push(a.envelope(edits, batch_id="replayed-1"))
    assert assert_refused_replay(renamed) == first["high_water"]
    # A's old batch re-signed by B after it was applied: still not B's, still refused.
    assert assert_refused(b.push(forged), "B replays A") == "envelope.bad_signature"
    assert counts(live) == before
    # Answers to A are sealed to A: B cannot open them.
    with pytest.raises(Exception, match=r"envelope\."):
        open_sealed(a.push(envelope).content, sender=a.hub_keys, recipient=b.keys)


def assert_refused_replay(answer: httpx.Response) -> int:
    assert answer.status_code == 409, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["code"] == "envelope.replayed"
    return int(body["high_water"])


@pytest.mark.parametrize("backend", database_backends())
def test_header_text_with_a_nul_is_refused_before_it_reaches_the_database(
    backend: str, tmp_path: Path
) -> None:
    with (
        fresh_database(backend) as url,
        live_hub(init_hub(tmp_path / "hub", url)) as (base, live),
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        device = HandDevice.enrol(http, live, "ras-jedir")
        # A Header refuses a NUL when it is built; a sender could still write one.
        # Signed by an enrolled device, the NUL reaches the hub inside a valid envelope.
        with pytest.raises(ValueError, match="control characters"):
            device.envelope([device.new_record("Amina")], batch_id="1-\x00")
        original_post_init = Header.__post_init__
        Header.__post_init__ = lambda self: None  # type: ignore[method-assign]
        try:
            signed = device.envelope([device.new_record("Amina")], batch_id="1-\x00")
        finally:
            Header.__post_init__ = original_post_init  # type: ignore[method-assign]
        answer = device.push(signed)
        assert assert_refused(answer, "NUL in batch_id") == "envelope.malformed"
        assert counts(live) == dict.fromkeys(TABLES, 0)
