"""Envelopes: round trips, tampering, zstd bombs and size, with real crypto."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
import zstandard
from cryptography.hazmat.primitives import hpke
from hypothesis import given, settings
from hypothesis import strategies as st

import sync.envelope
from sync.envelope import (
    PROTOCOL_VERSION,
    EnvelopeError,
    Header,
    open_sealed,
    read_header_unverified,
    seal,
)
from sync.keys import KemAlgorithm, KeyPairs, PublicKeys

DEVICE_A = KeyPairs.generate()
DEVICE_B = KeyPairs.generate()
HUB = KeyPairs.generate()
HUB_X25519 = KeyPairs.generate(KemAlgorithm.X25519)
DOMAIN = b"fieldreg/envelope/v1\x00"
HPKE_KEMS = {
    KemAlgorithm.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519,
    KemAlgorithm.X25519: hpke.KEM.X25519,
}
PROPERTY = settings(database=None, deadline=None)


def make_header(**changes: object) -> Header:
    values: dict[str, object] = {
        "protocol": PROTOCOL_VERSION,
        "schema_version": 3,
        "kind": "push",
        "sender": "device-A",
        "recipient": "hub",
        "batch_id": "0193a1c2-7d4e-7f00-8000-000000000001",
        "seq_first": 101,
        "seq_last": 180,
        "sent_at_ms": 1_732_900_000_000,
        "kem": KemAlgorithm.MLKEM768_X25519.value,
    }
    values.update(changes)
    return Header(**values)  # type: ignore[arg-type]


def seal_to(hub: KeyPairs, body: bytes = b"records", **changes: object) -> bytes:
    header = make_header(kem=hub.kem_algorithm.value, **changes)
    return seal(header, body, recipient=hub.public(), sender=DEVICE_A)


def open_from_a(data: bytes, **kwargs: object) -> sync.envelope.Opened:
    return open_sealed(data, sender=DEVICE_A.public(), recipient=HUB, **kwargs)  # type: ignore[arg-type]


def code_of(data: bytes, *, sender: PublicKeys | None = None, recipient: KeyPairs = HUB) -> str:
    with pytest.raises(EnvelopeError) as caught:
        open_sealed(data, sender=sender or DEVICE_A.public(), recipient=recipient)
    return caught.value.code


def forge(
    header: Header | bytes,
    compressed: bytes | None = None,
    *,
    ciphertext: bytes | None = None,
    to: PublicKeys | None = None,
    signer: KeyPairs = DEVICE_A,
    format_byte: int = 1,
) -> bytes:
    """Build an envelope from the wire-format spec, independently of `seal`."""
    header_bytes = header.to_bytes() if isinstance(header, Header) else header
    if ciphertext is None:
        to = to or HUB.public()
        suite = hpke.Suite(HPKE_KEMS[to.kem_algorithm], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        body = compressed if compressed is not None else zstandard.compress(b"x")
        ciphertext = suite.encrypt(body, to.kem_public_key(), info=DOMAIN + header_bytes)
    u32 = struct.Struct(">I").pack
    signature = signer.signing.sign(DOMAIN + u32(len(header_bytes)) + header_bytes + ciphertext)
    return (
        b"FRGE"
        + bytes([format_byte])
        + u32(len(header_bytes))
        + header_bytes
        + u32(len(ciphertext))
        + ciphertext
        + signature
    )


def regions(data: bytes) -> dict[str, int]:
    """Return one offset inside each region of an envelope."""
    header_len = struct.unpack_from(">I", data, 5)[0]
    ciphertext_at = 9 + header_len + 4
    return {
        "magic": 1,
        "format": 4,
        "header_length": 7,
        "header": 9 + header_len // 2,
        "ciphertext_length": 9 + header_len + 2,
        "ciphertext": ciphertext_at + 40,
        "ciphertext_tag": len(data) - 64 - 1,
        "signature": len(data) - 10,
    }


def test_exported_members() -> None:
    for name in sync.envelope.__all__:
        assert hasattr(sync.envelope, name)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("hub", [HUB, HUB_X25519], ids=["hybrid", "x25519"])
def test_round_trip(hub: KeyPairs) -> None:
    body = b'{"changes": []}' * 20
    data = seal_to(hub, body)
    opened = open_sealed(data, sender=DEVICE_A.public(), recipient=hub)
    assert opened.header == make_header(kem=hub.kem_algorithm.value)
    assert opened.body == body
    assert opened.body_sha256 == hashlib.sha256(body).hexdigest()
    assert read_header_unverified(data) == opened.header
    assert body.decode() not in repr(opened)


def test_empty_body_round_trips() -> None:
    assert open_from_a(seal_to(HUB, b"")).body == b""


# Header text: any character but controls (refused) and lone surrogates.
texts = st.text(
    st.characters(exclude_categories=["Cc", "Cs"]),
    min_size=1,
    max_size=128,
)
ints = st.integers(min_value=0, max_value=2**63 - 1)
headers = st.builds(
    lambda seq, **kw: Header(protocol=PROTOCOL_VERSION, seq_first=seq[0], seq_last=seq[1], **kw),
    seq=st.tuples(ints, ints).map(sorted),
    schema_version=ints,
    kind=texts,
    sender=texts,
    recipient=texts,
    batch_id=texts,
    sent_at_ms=ints,
    kem=st.sampled_from([k.value for k in KemAlgorithm]),
)


@PROPERTY
@given(header=headers, body=st.binary(max_size=64 * 1024))
def test_round_trip_property(header: Header, body: bytes) -> None:
    hub = HUB if header.kem == KemAlgorithm.MLKEM768_X25519 else HUB_X25519
    data = seal(header, body, recipient=hub.public(), sender=DEVICE_B)
    assert read_header_unverified(data) == header
    assert Header.from_bytes(header.to_bytes()) == header
    opened = open_sealed(data, sender=DEVICE_B.public(), recipient=hub)
    assert (opened.header, opened.body) == (header, body)


def test_sealing_twice_differs_but_digest_is_the_same() -> None:
    first, second = seal_to(HUB, b"same body"), seal_to(HUB, b"same body")
    assert first != second
    assert open_from_a(first).body_sha256 == open_from_a(second).body_sha256


# --- headers -------------------------------------------------------------------------------

CANONICAL = make_header().to_bytes()


def test_header_bytes_are_canonical() -> None:
    assert CANONICAL.startswith(b'{"batch_id":"0193')
    assert b" " not in CANONICAL
    assert make_header(kind="pull", sender="dév-ü").to_bytes().count("é".encode()) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"\xff\xfe",
        b"[" * 2000 + b"]" * 2000,
        CANONICAL.replace(b'{"', b'{ "'),
        CANONICAL.replace(b'"kind":"push"', b'"kind":"push","kind":"push"'),
        CANONICAL.replace(b'"kind":"push",', b""),
        CANONICAL.replace(b'"kind":"push"', b'"kind":"push","extra":1'),
        CANONICAL.replace(b'"kind":"push"', b'"kind":""'),
        CANONICAL.replace(b'"kind":"push"', b'"kind":"' + b"k" * 129 + b'"'),
        CANONICAL.replace(b'"kind":"push"', b'"kind":5'),
        CANONICAL.replace(b'"kind":"push"', b'"kind":"\\ud800"'),
        CANONICAL.replace(b'"kind":"push"', b'"kind":"p\\u0075sh"'),
        CANONICAL.replace(b'"seq_first":101', b'"seq_first":181'),
        CANONICAL.replace(b'"seq_first":101', b'"seq_first":-1'),
        CANONICAL.replace(b'"seq_first":101', b'"seq_first":101.0'),
        CANONICAL.replace(b'"seq_first":101', b'"seq_first":true'),
        CANONICAL.replace(b'"seq_first":101', b'"seq_first":NaN'),
        CANONICAL.replace(b'"seq_first":101', b'"seq_first":9223372036854775808'),
        CANONICAL.replace(b'"kem":"mlkem768-x25519"', b'"kem":"rsa"'),
        CANONICAL.replace(b'"protocol":1', b'"protocol":"1"'),
        CANONICAL + b" ",
        CANONICAL.replace(b"}", b' ,"x":"' + b"x" * 4096 + b'"}'),
    ],
)
def test_header_parse_is_strict(raw: bytes) -> None:
    with pytest.raises(EnvelopeError) as caught:
        Header.from_bytes(raw)
    assert caught.value.code == "envelope.malformed"


def test_other_protocol_is_unsupported_even_with_other_fields() -> None:
    with pytest.raises(EnvelopeError) as caught:
        Header.from_bytes(b'{"protocol":2,"something":"new"}')
    assert caught.value.code == "protocol.unsupported"


def test_header_construction_checks_fields() -> None:
    assert make_header(seq_first=0, seq_last=0).seq_last == 0
    assert type(make_header(kem=KemAlgorithm.X25519).kem) is str
    bad_fields: list[dict[str, object]] = [
        {"seq_first": 5, "seq_last": 4},
        {"kind": "x" * 129},
        {"sent_at_ms": -1},
        {"sent_at_ms": True},
        {"kind": "\ud800"},
        {"kem": "rsa"},
    ]
    for bad in bad_fields:
        with pytest.raises(ValueError):
            make_header(**bad)


# --- tampering -----------------------------------------------------------------------------

SEALED = seal_to(HUB, b"a batch of records " * 10)


@pytest.mark.parametrize("region", list(regions(SEALED)))
def test_flipped_bit_in_each_region_is_refused(region: str) -> None:
    tampered = bytearray(SEALED)
    tampered[regions(SEALED)[region]] ^= 0x01
    expected = {
        "format": {"protocol.unsupported"},
        "header": {"envelope.malformed", "envelope.bad_signature"},
        "ciphertext": {"envelope.bad_signature"},
        "ciphertext_tag": {"envelope.bad_signature"},
        "signature": {"envelope.bad_signature"},
    }
    assert code_of(bytes(tampered)) in expected.get(region, {"envelope.malformed"})


def test_edited_header_value_breaks_the_signature() -> None:
    tampered = SEALED.replace(b'"seq_last":180', b'"seq_last":181')
    assert tampered != SEALED
    assert read_header_unverified(tampered).seq_last == 181  # parses: it is unverified
    assert code_of(tampered) == "envelope.bad_signature"


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 8, 9, 50, -1100, -65, -64, -63, -1])
def test_truncated_envelope_is_malformed(cut: int) -> None:
    assert code_of(SEALED[:cut]) == "envelope.malformed"
    with pytest.raises(EnvelopeError):
        read_header_unverified(SEALED[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 64, SEALED])
def test_appended_bytes_are_malformed(extra: bytes) -> None:
    assert code_of(SEALED + extra) == "envelope.malformed"


def test_header_swapped_from_another_envelope() -> None:
    other_header = make_header(batch_id="another-batch").to_bytes()
    header_len = struct.unpack_from(">I", SEALED, 5)[0]
    rest = SEALED[9 + header_len :]
    swapped = SEALED[:5] + struct.pack(">I", len(other_header)) + other_header + rest
    assert code_of(swapped) == "envelope.bad_signature"
    # Even the true sender, re-signing, cannot move a ciphertext under another header.
    ciphertext = rest[4:-64]
    assert code_of(forge(other_header, ciphertext=ciphertext)) == "envelope.undecryptable"


def test_sender_is_bound_by_signature_and_info() -> None:
    header_len = struct.unpack_from(">I", SEALED, 5)[0]
    header_bytes = SEALED[9 : 9 + header_len]
    ciphertext = SEALED[9 + header_len + 4 : -64]
    resigned = forge(header_bytes, ciphertext=ciphertext, signer=DEVICE_B)
    assert code_of(resigned) == "envelope.bad_signature"
    # Against B's own key it opens, but the verified header still names device-A:
    # the hub, which checks header.sender against the key it used, refuses it.
    opened = open_sealed(resigned, sender=DEVICE_B.public(), recipient=HUB)
    assert opened.header.sender == "device-A"
    # B cannot rename the sender either: the header is the HPKE info.
    renamed = make_header(sender="device-B").to_bytes()
    stolen = forge(renamed, ciphertext=ciphertext, signer=DEVICE_B)
    assert code_of(stolen, sender=DEVICE_B.public()) == "envelope.undecryptable"


def test_wrong_recipient_key_is_undecryptable() -> None:
    other_hub = KeyPairs.generate()
    assert code_of(SEALED, recipient=other_hub) == "envelope.undecryptable"


def test_kem_mismatch() -> None:
    with pytest.raises(ValueError, match="kem"):
        seal(make_header(kem="x25519"), b"b", recipient=HUB.public(), sender=DEVICE_A)
    assert code_of(SEALED, recipient=HUB_X25519) == "envelope.undecryptable"
    # A header claiming x25519 over a hybrid ciphertext, to a hybrid recipient.
    lying = forge(make_header(kem="x25519"), to=HUB.public())
    assert code_of(lying) == "envelope.undecryptable"


@pytest.mark.parametrize("length", [0, 1, 47, 1135])
def test_short_ciphertext_is_undecryptable(length: int) -> None:
    assert code_of(forge(make_header(), ciphertext=bytes(length))) == "envelope.undecryptable"


def test_unsupported_protocol_and_format() -> None:
    newer = dataclasses.replace(make_header(), protocol=2)
    for data in (forge(newer), forge(make_header(), format_byte=2)):
        assert code_of(data) == "protocol.unsupported"
        with pytest.raises(EnvelopeError):
            read_header_unverified(data)
    with pytest.raises(ValueError, match="protocol"):
        seal(newer, b"", recipient=HUB.public(), sender=DEVICE_A)


def test_lengths_over_the_limits_are_malformed() -> None:
    huge_header = SEALED[:5] + struct.pack(">I", 4097) + b"{" * 4097 + SEALED[9:]
    assert code_of(huge_header) == "envelope.malformed"
    header_len = struct.unpack_from(">I", SEALED, 5)[0]
    at = 9 + header_len
    huge_ciphertext = SEALED[:at] + struct.pack(">I", 2**32 - 1) + SEALED[at + 4 :]
    assert code_of(huge_ciphertext) == "envelope.malformed"


SMALL = seal_to(HUB_X25519, b"small")


def test_every_single_byte_flip_is_refused() -> None:
    for position in range(len(SMALL)):
        tampered = bytearray(SMALL)
        tampered[position] ^= 0xFF
        with pytest.raises(EnvelopeError):
            open_sealed(bytes(tampered), sender=DEVICE_A.public(), recipient=HUB_X25519)


@settings(database=None, deadline=None, max_examples=300)
@given(position=st.integers(0, len(SEALED) - 1), mask=st.integers(1, 255))
def test_random_mutation_always_raises_envelope_error(position: int, mask: int) -> None:
    tampered = bytearray(SEALED)
    tampered[position] ^= mask
    with pytest.raises(EnvelopeError):
        open_from_a(bytes(tampered))


def test_errors_name_no_plaintext() -> None:
    secret = b"Amina Yusuf, born 1990"
    data = seal_to(HUB, secret)
    for recipient in (HUB_X25519, KeyPairs.generate()):
        with pytest.raises(EnvelopeError) as caught:
            open_sealed(data, sender=DEVICE_A.public(), recipient=recipient)
        assert "Amina" not in str(caught.value)
        assert caught.value.detail in str(caught.value)


# --- zstd bombs ----------------------------------------------------------------------------


def raw_frame(declared: int, payload: bytes) -> bytes:
    """A zstd frame with one raw block, declaring `declared` bytes (single segment)."""
    assert declared < 256 and len(payload) < 2**21
    block_header = ((len(payload) << 3) | 1).to_bytes(3, "little")  # last block, raw
    return b"\x28\xb5\x2f\xfd\x20" + bytes([declared]) + block_header + payload


def test_raw_frame_helper_is_valid_zstd() -> None:
    assert open_from_a(forge(make_header(), raw_frame(5, b"hello"))).body == b"hello"


def test_body_over_the_limit_is_refused() -> None:
    data = seal_to(HUB, bytes(2 * 1024 * 1024))
    assert len(data) < 2000
    with pytest.raises(EnvelopeError) as caught:
        open_from_a(data, max_body_bytes=1024 * 1024)
    assert caught.value.code == "envelope.malformed"
    assert len(open_from_a(data, max_body_bytes=2 * 1024 * 1024).body) == 2 * 1024 * 1024


def test_frame_declaring_a_huge_size_is_refused_before_decompressing() -> None:
    frame = b"\x28\xb5\x2f\xfd\xe0" + (2**40).to_bytes(8, "little") + b"\x09\x00\x00x"
    assert zstandard.frame_content_size(frame) == 2**40
    assert code_of(forge(make_header(), frame)) == "envelope.malformed"


@pytest.mark.parametrize(
    "compressed",
    [
        zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000)),
        raw_frame(10, b"x" * 100),
        raw_frame(100, b"x" * 10),
        raw_frame(0, b"x" * 100),
        raw_frame(0, b"") + b"junk",
        raw_frame(5, b"hello") + b"junk",
        raw_frame(5, b"hello") + raw_frame(5, b"hello"),
        raw_frame(5, b"hello")[:-1],
        b"not zstd at all",
        b"",
    ],
)
def test_bad_zstd_is_malformed(compressed: bytes) -> None:
    assert code_of(forge(make_header(), compressed)) == "envelope.malformed"


# --- size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("hub", "kem_bytes"), [(HUB, 1136), (HUB_X25519, 48)])
def test_size(hub: KeyPairs, kem_bytes: int) -> None:
    body = b'{"id":"0193a1c2","names":["Ahmed","Mohamed"],"site":"Ras Ajdir"}\n' * 1600
    assert 100_000 < len(body) < 110_000
    data = seal_to(hub, body)
    assert len(data) < len(body) // 10
    header_len = struct.unpack_from(">I", data, 5)[0]
    ciphertext_len = struct.unpack_from(">I", data, 9 + header_len)[0]
    compressed_len = len(zstandard.ZstdCompressor(level=3).compress(body))
    assert ciphertext_len - compressed_len == kem_bytes
    assert len(data) == 4 + 1 + 4 + header_len + 4 + ciphertext_len + 64


def test_header_text_refuses_control_characters() -> None:
    for bad in ("1-\x00", "a\nb", "\x7f"):
        with pytest.raises(ValueError, match="control characters"):
            Header(
                protocol=1,
                schema_version=1,
                kind="push",
                sender="d",
                recipient="hub",
                batch_id=bad,
                seq_first=1,
                seq_last=1,
                sent_at_ms=0,
                kem="x25519",
            )
