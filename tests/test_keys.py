"""Key pairs: serialisation round trips, fingerprints, and refusal of garbage."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

import sync.keys
from sync.keys import KemAlgorithm, KeyFormatError, KeyPairs, PublicKeys

HYBRID = KeyPairs.generate()
CLASSIC = KeyPairs.generate(KemAlgorithm.X25519)
BOTH = pytest.mark.parametrize("pairs", [HYBRID, CLASSIC], ids=["hybrid", "x25519"])


def test_exported_members() -> None:
    for name in sync.keys.__all__:
        assert hasattr(sync.keys, name)


def test_default_is_hybrid_with_documented_sizes() -> None:
    assert HYBRID.kem_algorithm is KemAlgorithm.MLKEM768_X25519
    assert len(HYBRID.public().kem) == 1184 + 32
    assert len(CLASSIC.public().kem) == 32
    assert len(HYBRID.public().signing) == 32
    assert len(HYBRID.to_bytes()) == 6 + 32 + 64 + 32
    assert len(CLASSIC.to_bytes()) == 6 + 32 + 32


@BOTH
def test_private_round_trip(pairs: KeyPairs) -> None:
    restored = KeyPairs.from_bytes(pairs.to_bytes())
    assert restored.public() == pairs.public()
    assert restored.to_bytes() == pairs.to_bytes()
    assert restored.kem_algorithm is pairs.kem_algorithm


@BOTH
def test_restored_keys_still_work(pairs: KeyPairs) -> None:
    restored = KeyPairs.from_bytes(pairs.to_bytes())
    kem = {
        KemAlgorithm.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519,
        KemAlgorithm.X25519: hpke.KEM.X25519,
    }
    suite = hpke.Suite(kem[pairs.kem_algorithm], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    ciphertext = suite.encrypt(b"hello", pairs.public().kem_public_key(), info=b"t")
    assert suite.decrypt(ciphertext, restored.kem_private_key(), info=b"t") == b"hello"
    signature = restored.signing.sign(b"message")
    pairs.public().signing_public_key().verify(signature, b"message")


@BOTH
def test_public_json_round_trip(pairs: KeyPairs) -> None:
    data = pairs.public().to_json()
    assert set(data) == {"signing", "kem", "kem_algorithm"}
    assert all(isinstance(v, str) and "=" not in v for v in data.values())
    assert data["kem_algorithm"] == pairs.kem_algorithm.value
    assert PublicKeys.from_json(data) == pairs.public()


def test_fingerprint_is_stable_grouped_and_distinct() -> None:
    public = HYBRID.public()
    fingerprint = public.fingerprint()
    assert re.fullmatch(r"[0-9A-F]{4}( [0-9A-F]{4}){9}", fingerprint)
    assert PublicKeys.from_json(public.to_json()).fingerprint() == fingerprint
    assert KeyPairs.from_bytes(HYBRID.to_bytes()).public().fingerprint() == fingerprint
    others = {KeyPairs.generate().public().fingerprint(), CLASSIC.public().fingerprint()}
    assert fingerprint not in others


def test_fingerprint_covers_every_field() -> None:
    public = CLASSIC.public()
    other = KeyPairs.generate(KemAlgorithm.X25519).public()
    swapped_signing = PublicKeys(other.signing, public.kem, public.kem_algorithm)
    swapped_kem = PublicKeys(public.signing, other.kem, public.kem_algorithm)
    assert (
        len({public.fingerprint(), swapped_signing.fingerprint(), swapped_kem.fingerprint()}) == 3
    )


def test_repr_shows_no_private_material() -> None:
    text = repr(HYBRID)
    assert HYBRID.public().fingerprint() in text
    private = HYBRID.to_bytes()
    for secret in (private[6:38], private[38:102], private[102:]):
        assert secret.hex() not in text.lower()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json_with(**changes: object) -> object:
    data: dict[str, object] = dict(HYBRID.public().to_json())
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "a string",
        {},
        _json_with(kem_algorithm="rsa"),
        _json_with(kem_algorithm=7),
        _json_with(kem_algorithm=None),
        _json_with(extra="x"),
        _json_with(signing=_b64(bytes(31))),
        _json_with(signing=_b64(bytes(33))),
        _json_with(signing=_b64(bytes(32)) + "=="),
        _json_with(signing="not base64!"),
        _json_with(signing=b"bytes, not text"),
        _json_with(signing=_b64(bytes(32)).replace("A", "+")),
        _json_with(signing="AAAA AAAA"),
        _json_with(kem=_b64(bytes(32))),
        _json_with(kem=_b64(b"\xff" * (1184 + 32))),
        _json_with(kem_algorithm="x25519"),
        _json_with(kem=_b64(HYBRID.public().kem[:1184] + bytes(32))),
        _json_with(kem=_b64(bytes(32)), kem_algorithm="x25519"),
    ],
)
def test_from_json_refuses_garbage(data: object) -> None:
    with pytest.raises(KeyFormatError):
        PublicKeys.from_json(data)


def test_from_json_refuses_non_canonical_base64() -> None:
    text = _b64(bytes(31) + b"\x01")
    # The last character carries 2 spare bits; setting them spells the same bytes.
    sloppy = text[:-1] + chr(ord(text[-1]) + 1)
    assert base64.urlsafe_b64decode(sloppy + "=") == base64.urlsafe_b64decode(text + "=")
    with pytest.raises(KeyFormatError, match="canonical"):
        PublicKeys.from_json(_json_with(signing=sloppy))


def test_low_order_x25519_key_is_refused_up_front() -> None:
    assert x25519.X25519PublicKey.from_public_bytes(bytes(32))  # cryptography accepts it
    with pytest.raises(KeyFormatError, match="low-order"):
        PublicKeys(CLASSIC.public().signing, bytes(32), KemAlgorithm.X25519)


def test_key_format_error_is_a_value_error_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"signing: expected 32 bytes"):
        PublicKeys.from_json(_json_with(signing=_b64(bytes(5))))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"FRKP",
        b"garbage" * 20,
        HYBRID.to_bytes()[:-1],
        HYBRID.to_bytes() + b"\x00",
        CLASSIC.to_bytes()[:-1],
        b"XXXX" + HYBRID.to_bytes()[4:],
        HYBRID.to_bytes()[:4] + b"\x02" + HYBRID.to_bytes()[5:],
        HYBRID.to_bytes()[:5] + b"\x09" + HYBRID.to_bytes()[6:],
        HYBRID.to_bytes()[:5] + b"\x02" + HYBRID.to_bytes()[6:],
        CLASSIC.to_bytes()[:5] + b"\x01" + CLASSIC.to_bytes()[6:],
        "FRKP text",
    ],
)
def test_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(KeyFormatError):
        KeyPairs.from_bytes(data)


def test_key_pairs_refuse_inconsistent_halves() -> None:
    with pytest.raises(ValueError):
        KeyPairs(HYBRID.signing, HYBRID.kem_x25519, None, KemAlgorithm.MLKEM768_X25519)
    with pytest.raises(ValueError):
        KeyPairs(HYBRID.signing, HYBRID.kem_x25519, HYBRID.kem_mlkem, KemAlgorithm.X25519)
