"""Password hashing as the hub's request threads use it: several at once."""

from __future__ import annotations

import threading
import time

from server.passwords import hash_password, verify_password


def test_passwords_checked_in_several_threads_at_once_all_finish() -> None:
    # OpenSSL runs Argon2's lanes on a small process-wide thread pool; two
    # derivations sharing it at once used to wait for each other for ever.
    stored = hash_password("the right password")
    results: list[bool] = []

    def check(password: str) -> None:
        results.append(verify_password(password, stored))

    guesses = ["the right password", "a wrong password", "another wrong one"]
    threads = [threading.Thread(target=check, args=(g,), daemon=True) for g in guesses]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30  # one check takes about half a second
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a password check never finished"
    assert sorted(results) == [False, False, True]
