"""RFC 9421 signatures on pull requests: shape, round trips, tampering, garbage."""

from __future__ import annotations

import base64
import contextlib

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.http_signature import (
    SignatureError,
    SignatureParams,
    read_key_id_unverified,
    sign_request,
    verify_request,
)

PROPERTY = settings(database=None, deadline=None, max_examples=200)
DEVICE_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
PATH = "/api/v1/sync/pull"
QUERY = "cursor=abc&limit=10"
CREATED = 1_700_000_000
PARAMS = '("@method" "@path" "@query");created=1700000000;keyid="dev-1";alg="ed25519"'


def signed(**changes: object) -> dict[str, str]:
    values: dict[str, object] = {
        "method": "GET",
        "path": PATH,
        "query": QUERY,
        "key_id": "dev-1",
        "private_key": DEVICE_KEY,
        "created": CREATED,
    }
    values.update(changes)
    return sign_request(**values)  # type: ignore[arg-type]


def verify(headers: dict[str, str], **changes: object) -> SignatureParams:
    values: dict[str, object] = {
        "method": "GET",
        "path": PATH,
        "query": QUERY,
        "headers": headers,
        "public_key": DEVICE_KEY.public_key(),
    }
    values.update(changes)
    return verify_request(**values)  # type: ignore[arg-type]


def code_of(headers: dict[str, str], **changes: object) -> str:
    with pytest.raises(SignatureError) as caught:
        verify(headers, **changes)
    return caught.value.code


def test_headers_follow_rfc_9421() -> None:
    headers = signed()
    assert set(headers) == {"Signature-Input", "Signature"}
    assert headers["Signature-Input"] == f"sig1={PARAMS}"
    assert headers["Signature"].startswith("sig1=:")
    assert headers["Signature"].endswith(":")
    # The signature base, written out from the RFC rather than from the module.
    base = (
        '"@method": GET\n'
        '"@path": /api/v1/sync/pull\n'
        '"@query": ?cursor=abc&limit=10\n'
        f'"@signature-params": {PARAMS}'
    )
    signature = base64.b64decode(headers["Signature"][len("sig1=:") : -1], validate=True)
    DEVICE_KEY.public_key().verify(signature, base.encode("ascii"))


def test_an_empty_query_is_signed_as_a_lone_question_mark() -> None:
    headers = signed(query="")
    base = f'"@method": GET\n"@path": {PATH}\n"@query": ?\n"@signature-params": {PARAMS}'
    signature = base64.b64decode(headers["Signature"][len("sig1=:") : -1], validate=True)
    DEVICE_KEY.public_key().verify(signature, base.encode("ascii"))


@pytest.mark.parametrize("query", ["", QUERY, "cursor=%2F%3F&limit=1"])
@pytest.mark.parametrize("key_id", ["dev-1", 'odd "quoted" \\ id', " "])
def test_round_trip(query: str, key_id: str) -> None:
    headers = signed(query=query, key_id=key_id)
    params = verify(headers, query=query)
    assert params == SignatureParams(key_id=key_id, created=CREATED)
    assert read_key_id_unverified(headers) == key_id


def test_an_empty_path_is_the_root() -> None:
    assert verify(signed(path=""), path="/").key_id == "dev-1"


@pytest.mark.parametrize("created", [0, 1, CREATED - 86_400 * 365, 999_999_999_999_999])
def test_created_is_returned_and_never_judged(created: int) -> None:
    assert verify(signed(created=created)).created == created


def test_header_names_are_case_insensitive() -> None:
    headers = signed()
    lower = {name.lower(): value for name, value in headers.items()}
    upper = {name.upper(): value for name, value in headers.items()}
    assert verify(lower).key_id == verify(upper).key_id == "dev-1"
    assert read_key_id_unverified(upper) == "dev-1"


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "POST"},
        {"method": "get"},
        {"path": "/api/v1/sync/push"},
        {"path": "/api/v1/sync/pull/"},
        {"query": "cursor=abd&limit=10"},
        {"query": ""},
        {"query": "?" + QUERY},
    ],
    ids=repr,
)
def test_a_different_request_is_invalid(changes: dict[str, str]) -> None:
    assert code_of(signed(), **changes) == "signature.invalid"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('keyid="dev-1"', 'keyid="dev-2"'),
        ("created=1700000000", "created=1700000001"),
        (
            ';created=1700000000;keyid="dev-1";alg="ed25519"',
            ';keyid="dev-1";created=1700000000;alg="ed25519"',
        ),
    ],
    ids=["keyid", "created", "parameter order"],
)
def test_tampered_parameters_are_invalid(old: str, new: str) -> None:
    headers = signed()
    headers["Signature-Input"] = headers["Signature-Input"].replace(old, new)
    assert code_of(headers) == "signature.invalid"


@pytest.mark.parametrize("index", [0, 31, 63])
def test_tampered_signature_bytes_are_invalid(index: int) -> None:
    headers = signed()
    raw = bytearray(base64.b64decode(headers["Signature"][len("sig1=:") : -1]))
    raw[index] ^= 0x01
    headers["Signature"] = f"sig1=:{base64.b64encode(raw).decode()}:"
    assert code_of(headers) == "signature.invalid"


def test_the_wrong_key_is_invalid() -> None:
    assert code_of(signed(), public_key=OTHER_KEY.public_key()) == "signature.invalid"
    assert code_of(signed(private_key=OTHER_KEY)) == "signature.invalid"


@pytest.mark.parametrize("missing", ["Signature-Input", "Signature"])
def test_a_missing_header_is_reported(missing: str) -> None:
    headers = signed()
    del headers[missing]
    assert code_of(headers) == "signature.missing"


def test_no_headers_at_all() -> None:
    assert code_of({}) == "signature.missing"
    with pytest.raises(SignatureError) as caught:
        read_key_id_unverified({"Accept": "application/json"})
    assert caught.value.code == "signature.missing"


VALID_INPUT = f"sig1={PARAMS}"
MALFORMED_INPUTS = [
    "",
    "sig1",
    PARAMS,
    VALID_INPUT.replace("sig1=", "sig2="),
    f"{VALID_INPUT}, sig2={PARAMS}",
    VALID_INPUT.replace('"@query")', '"@query" "@authority")'),
    VALID_INPUT.replace('("@method" "@path" "@query")', '("@path" "@method" "@query")'),
    VALID_INPUT.replace('"@method" "@path"', '"@method"  "@path"'),
    VALID_INPUT.replace(';alg="ed25519"', ""),
    VALID_INPUT.replace(';alg="ed25519"', ';alg="rsa-pss-sha512"'),
    VALID_INPUT.replace(';alg="ed25519"', ';alg="ed25519";nonce="x"'),
    VALID_INPUT.replace(';alg="ed25519"', ';alg="ed25519";created=1'),
    VALID_INPUT.replace(";created=1700000000", ';created="1700000000"'),
    VALID_INPUT.replace(";created=1700000000", ";created=01700000000"),
    VALID_INPUT.replace(";created=1700000000", ";created=-1"),
    VALID_INPUT.replace(";created=1700000000", ";created=1700000000.5"),
    VALID_INPUT.replace(";created=1700000000", ";created=1234567890123456"),
    VALID_INPUT.replace(";created=1700000000", ";created=١٧٠٠"),
    VALID_INPUT.replace('keyid="dev-1"', "keyid=dev-1"),
    VALID_INPUT.replace('keyid="dev-1"', 'keyid=""'),
    VALID_INPUT.replace('keyid="dev-1"', 'keyid="dév-1"'),
    VALID_INPUT.replace('keyid="dev-1"', 'keyid="dev\\1"'),
    VALID_INPUT.replace('keyid="dev-1"', 'keyid="dev-1'),
    VALID_INPUT.replace(";keyid", "; keyid"),
    VALID_INPUT + ";",
    VALID_INPUT + "\n",
]


@pytest.mark.parametrize("text", MALFORMED_INPUTS, ids=repr)
def test_malformed_signature_input(text: str) -> None:
    headers = signed() | {"Signature-Input": text}
    assert code_of(headers) == "signature.malformed"
    with pytest.raises(SignatureError) as caught:
        read_key_id_unverified(headers)
    assert caught.value.code == "signature.malformed"


def _signature_text() -> str:
    return signed()["Signature"][len("sig1=:") : -1]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sig1=",
        "sig1=::",
        f"sig1={_signature_text()}",
        f"sig2=:{_signature_text()}:",
        f"sig1=:{_signature_text()}:, sig1=:{_signature_text()}:",
        f"sig1=:{_signature_text().rstrip('=')}:",  # padding is required
        f"sig1=:{_signature_text().replace('+', '-').replace('/', '_')}x:",
        f"sig1=:{base64.b64encode(bytes(63)).decode()}:",
        f"sig1=:{base64.b64encode(bytes(65)).decode()}:",
        f"sig1=:{_signature_text()[:-3]}B==:",  # non-zero padding bits
        f"sig1=:{_signature_text()}:;alg=x",
    ],
    ids=repr,
)
def test_malformed_signature(text: str) -> None:
    assert code_of(signed() | {"Signature": text}) == "signature.malformed"


def test_two_spellings_of_one_header_are_malformed() -> None:
    headers = signed()
    headers["signature-input"] = headers["Signature-Input"]
    assert code_of(headers) == "signature.malformed"


def test_an_httpx_request_verifies_and_a_repeated_header_does_not() -> None:
    request = httpx.Request("GET", f"https://hub.example{PATH}?{QUERY}", headers=signed())
    params = verify_request(
        method=request.method,
        path=request.url.path,
        query=request.url.query.decode("ascii"),
        headers=request.headers,
        public_key=DEVICE_KEY.public_key(),
    )
    assert params == SignatureParams(key_id="dev-1", created=CREATED)
    repeated = httpx.Headers([*signed().items(), ("signature", signed()["Signature"])])
    assert code_of(repeated) == "signature.malformed"  # type: ignore[arg-type]


def test_surrounding_whitespace_is_ignored() -> None:
    headers = {name: f" \t{value} " for name, value in signed().items()}
    assert verify(headers).key_id == "dev-1"


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "GET /"},
        {"method": ""},
        {"path": "api/v1/sync/pull"},
        {"path": '/api/v1/sync/pull\n"@query": ?'},
        {"query": "a b"},
        {"query": "café"},
    ],
    ids=repr,
)
def test_a_request_that_cannot_be_signed(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        signed(**changes)
    assert code_of(signed(), **changes) == "signature.invalid"


@pytest.mark.parametrize(
    "changes",
    [{"key_id": ""}, {"key_id": "dév"}, {"key_id": "a\nb"}, {"created": -1}, {"created": True}],
    ids=repr,
)
def test_parameters_that_cannot_be_signed(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        signed(**changes)


@PROPERTY
@given(signature_input=st.text(max_size=200), signature=st.text(max_size=200))
def test_garbage_headers_raise_only_signature_error(signature_input: str, signature: str) -> None:
    headers = {"Signature-Input": signature_input, "Signature": signature}
    with pytest.raises(SignatureError):
        verify(headers)
    with contextlib.suppress(SignatureError):
        read_key_id_unverified(headers)


@PROPERTY
@given(data=st.data(), name=st.sampled_from(["Signature-Input", "Signature"]))
def test_mutated_headers_never_verify(data: st.DataObject, name: str) -> None:
    headers = signed()
    text = headers[name]
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 4)))
    replacement = data.draw(st.text(max_size=4))
    mutated = text[:start] + replacement + text[end:]
    if mutated.strip(" \t") == text:
        return
    headers[name] = mutated
    with pytest.raises(SignatureError) as caught:
        verify(headers)
    assert caught.value.code in {"signature.malformed", "signature.invalid"}
