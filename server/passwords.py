"""Password hashing with Argon2id (cryptography), in a self-describing string.

One derivation at a time per process: OpenSSL runs Argon2's lanes on a small
process-wide thread pool (cryptography sizes it to the CPU count), and two
derivations that start at once can each hold part of it while waiting for the
rest, for ever. The hub checks passwords in request threads, so two logins at
the same moment would hang both requests and their database connections.
"""

from __future__ import annotations

import base64
import hmac
import os
import threading

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

__all__ = ["hash_password", "verify_password"]

_ITERATIONS, _LANES, _MEMORY_KIB = 3, 4, 64 * 1024
_ONE_AT_A_TIME = threading.Lock()


def _derive(password: str, salt: bytes, iterations: int, lanes: int, memory_kib: int) -> bytes:
    kdf = Argon2id(salt=salt, length=32, iterations=iterations, lanes=lanes, memory_cost=memory_kib)
    with _ONE_AT_A_TIME:
        return kdf.derive(password.encode("utf-8"))


def hash_password(password: str) -> str:
    """`argon2id$iterations$lanes$memory$salt$hash` (base64) for storage."""
    salt = os.urandom(16)
    digest = _derive(password, salt, _ITERATIONS, _LANES, _MEMORY_KIB)
    b64 = base64.b64encode
    return (
        f"argon2id${_ITERATIONS}${_LANES}${_MEMORY_KIB}${b64(salt).decode()}${b64(digest).decode()}"
    )


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored`; False for any malformed hash."""
    try:
        kind, iterations, lanes, memory, salt, digest = stored.split("$")
        if kind != "argon2id":
            return False
        derived = _derive(
            password, base64.b64decode(salt), int(iterations), int(lanes), int(memory)
        )
        return hmac.compare_digest(derived, base64.b64decode(digest))
    except ValueError:
        return False
