"""HTTP Message Signatures (RFC 9421) for a device's body-less GET requests.

A device signs `GET /api/v1/sync/pull?cursor=...` with its Ed25519 key so the
hub knows who is pulling. Only one shape is made and accepted: label `sig1`,
covered components exactly `("@method" "@path" "@query")`, and the parameters
`created`, `keyid` and `alg="ed25519"`, in canonical Structured Fields form
(RFC 8941). The signature base is::

    "@method": GET
    "@path": /api/v1/sync/pull
    "@query": ?cursor=abc&limit=10
    "@signature-params": ("@method" "@path" "@query");created=1700000000;keyid="dev-1";alg="ed25519"

There is deliberately no freshness window on `created`: device clocks can be a
day or more off, and replaying a pull is harmless because its response is
sealed to the device's own key. `created` is signed and returned, not judged.
Every failure to verify is one `SignatureError` with a stable code.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "SignatureError",
    "SignatureErrorCode",
    "SignatureParams",
    "read_key_id_unverified",
    "sign_request",
    "verify_request",
]

SignatureErrorCode = Literal["signature.missing", "signature.malformed", "signature.invalid"]

_LABEL = "sig1"
_ALGORITHM = "ed25519"
_COMPONENTS = '("@method" "@path" "@query")'
_SIGNATURE_BYTES = 64
_MAX_CREATED = 999_999_999_999_999  # the largest Structured Fields integer
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
_KEY_ID = re.compile(r"[\x20-\x7e]+")
# One parameter: `;name=` then a non-negative integer without leading zeros or
# a quoted string whose only escapes are \" and \\ (RFC 8941 sf-string).
_PARAM = re.compile(r';([a-z]+)=(0|[1-9][0-9]{0,14}|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*")')
_SIGNATURE = re.compile(r"sig1=:([A-Za-z0-9+/=]*):")


class SignatureError(Exception):
    """A request signature that is missing, unreadable or wrong.

    `code` is stable and dotted (see `SignatureErrorCode`); `detail` is a
    sentence for people.
    """

    def __init__(self, code: SignatureErrorCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: SignatureErrorCode = code
        self.detail = detail


@dataclass(frozen=True)
class SignatureParams:
    """What a verified signature says: who signed (`key_id`) and when they claim (`created`)."""

    key_id: str
    created: int


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _params_text(*, key_id: str, created: int) -> str:
    return f"{_COMPONENTS};created={created};keyid={_quote(key_id)};alg={_quote(_ALGORITHM)}"


def _request_problem(method: str, path: str, query: str) -> str | None:
    if not _TOKEN.fullmatch(method):
        return "the method is not an HTTP token"
    if path and (not path.startswith("/") or not _VISIBLE_ASCII.fullmatch(path)):
        return "the path is not an absolute path of visible ASCII"
    if not _VISIBLE_ASCII.fullmatch(query):
        return "the query is not visible ASCII"
    return None


def _signature_base(*, method: str, path: str, query: str, params_text: str) -> bytes:
    lines = (
        f'"@method": {method}',
        f'"@path": {path or "/"}',  # RFC 9421 §2.2.6: an empty path is "/"
        f'"@query": ?{query}',  # §2.2.7: the "?" is part of the value, alone if empty
        f'"@signature-params": {params_text}',
    )
    return "\n".join(lines).encode("ascii")


def sign_request(
    *,
    method: str,
    path: str,
    query: str,
    key_id: str,
    private_key: Ed25519PrivateKey,
    created: int,
) -> dict[str, str]:
    """Return the `Signature-Input` and `Signature` headers for one request.

    `path` is the request path ("/api/v1/sync/pull"), `query` the raw query
    string without its "?" ("cursor=abc&limit=10", or "" for none), both as
    sent on the wire. `created` is Unix seconds from the caller's clock. Raises
    ValueError for a request or key id that cannot be signed; changes nothing.
    """
    if problem := _request_problem(method, path, query):
        raise ValueError(problem)
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError("key_id must be non-empty printable ASCII")
    is_integer = isinstance(created, int) and not isinstance(created, bool)
    if not is_integer or not 0 <= created <= _MAX_CREATED:
        raise ValueError(f"created must be an integer from 0 to {_MAX_CREATED}")
    params_text = _params_text(key_id=key_id, created=created)
    base = _signature_base(method=method, path=path, query=query, params_text=params_text)
    signature = base64.b64encode(private_key.sign(base)).decode("ascii")
    return {
        "Signature-Input": f"{_LABEL}={params_text}",
        "Signature": f"{_LABEL}=:{signature}:",
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    # Names are case-insensitive; a plain dict may hold two spellings of one name.
    found: list[object] = [
        headers[key] for key in headers if isinstance(key, str) and key.lower() == name.lower()
    ]
    if not found:
        raise SignatureError("signature.missing", f"no {name} header")
    if len(found) > 1:
        raise SignatureError("signature.malformed", f"more than one {name} header")
    value = found[0]
    if not isinstance(value, str):
        raise SignatureError("signature.malformed", f"the {name} header is not text")
    return value.strip(" \t")


def _parse_input(text: str) -> tuple[str, SignatureParams]:
    prefix = f"{_LABEL}={_COMPONENTS}"
    if not text.startswith(prefix):
        raise SignatureError(
            "signature.malformed",
            f"Signature-Input must be one {_LABEL} covering {_COMPONENTS}",
        )
    params: dict[str, str] = {}
    position = len(prefix)
    while position < len(text):
        match = _PARAM.match(text, position)
        if match is None:
            raise SignatureError("signature.malformed", "Signature-Input parameters are malformed")
        name, value = match.groups()
        if name in params:
            raise SignatureError("signature.malformed", f"parameter {name} is repeated")
        params[name] = value
        position = match.end()
    if sorted(params) != ["alg", "created", "keyid"]:
        raise SignatureError(
            "signature.malformed", "Signature-Input needs exactly created, keyid and alg"
        )
    created, key_id, alg = params["created"], params["keyid"], params["alg"]
    if created.startswith('"') or not key_id.startswith('"') or not alg.startswith('"'):
        raise SignatureError(
            "signature.malformed", "created must be an integer; keyid and alg quoted strings"
        )
    if _unquote(alg) != _ALGORITHM:
        raise SignatureError("signature.malformed", f'alg must be "{_ALGORITHM}"')
    if not _unquote(key_id):
        raise SignatureError("signature.malformed", "keyid is empty")
    return text[len(_LABEL) + 1 :], SignatureParams(key_id=_unquote(key_id), created=int(created))


def _parse_signature(text: str) -> bytes:
    match = _SIGNATURE.fullmatch(text)
    if match is None:
        raise SignatureError("signature.malformed", f"Signature must be one {_LABEL}=:base64:")
    try:
        raw = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature.malformed", "Signature is not valid base64") from None
    if len(raw) != _SIGNATURE_BYTES or base64.b64encode(raw).decode("ascii") != match.group(1):
        raise SignatureError("signature.malformed", "Signature is not 64 bytes in canonical base64")
    return raw


def read_key_id_unverified(headers: Mapping[str, str]) -> str:
    """Return the keyid claimed by `Signature-Input`, so the caller can find the key.

    Nothing is verified: use the result only to look up the public key to pass
    to `verify_request`. Raises `SignatureError` (missing or malformed).
    """
    _, params = _parse_input(_header(headers, "Signature-Input"))
    return params.key_id


def verify_request(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    public_key: Ed25519PublicKey,
) -> SignatureParams:
    """Check the request's signature against `public_key`; return its parameters.

    `method`, `path` and `query` are the request as received (query without
    its "?"); header names match case-insensitively. Raises `SignatureError`
    and nothing else: `signature.missing`, `signature.malformed` or
    `signature.invalid`. Does not judge how old `created` is.
    """
    params_text, params = _parse_input(_header(headers, "Signature-Input"))
    signature = _parse_signature(_header(headers, "Signature"))
    if problem := _request_problem(method, path, query):
        raise SignatureError("signature.invalid", f"the request cannot be signed: {problem}")
    base = _signature_base(method=method, path=path, query=query, params_text=params_text)
    try:
        public_key.verify(signature, base)
    except InvalidSignature:
        raise SignatureError("signature.invalid", "the signature does not match") from None
    return params
