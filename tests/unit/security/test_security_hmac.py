"""The engine's HMAC-SHA256 (:func:`kflow.security.tokens.hmac_sha256`) is the standard one, for every key length."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time

import pytest

from kflow.security import tokens
from kflow.security.principal import AuthError
from kflow.security.tokens import Keys, attempt_token, check_attempt_token, hmac_sha256, issue, verify_token


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 200])
@pytest.mark.parametrize("msg_len", [0, 1, 55, 64, 1000, 5000])
def test_hmac_sha256_is_rfc2104(key_len: int, msg_len: int) -> None:
    key, msg = bytes(range(256))[:key_len], bytes((i * 7) % 256 for i in range(msg_len))
    assert hmac_sha256(key, msg) == hmac.digest(key, msg, "sha256")
    assert hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()  # and again, from the cached pads


def test_rfc4231_case_2() -> None:
    assert hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_keys_do_not_share_pads() -> None:
    a, b = b"a" * 32, b"b" * 32
    assert hmac_sha256(a, b"m") != hmac_sha256(b, b"m")
    assert attempt_token(a, "i", "s", 1) != attempt_token(b, "i", "s", 1)
    assert not check_attempt_token(b, "i", "s", 1, attempt_token(a, "i", "s", 1))
    assert check_attempt_token(a, "i", "s", 1, attempt_token(a, "i", "s", 1))


def test_cache_stays_bounded_and_correct() -> None:
    for i in range(3 * tokens._HMAC_PADS_MAX):
        key = i.to_bytes(4, "big") * 8
        assert hmac_sha256(key, b"x") == hmac.digest(key, b"x", "sha256")
    assert len(tokens._HMAC_PADS) <= tokens._HMAC_PADS_MAX


def test_attempt_token_matches_its_definition() -> None:
    secret = b"s" * 32
    msg = b"".join(len(p).to_bytes(4, "big") + p for p in (b"kflow.attempt.v1", "ï1".encode(), b"step", b"3"))
    expected = hmac.digest(secret, msg, "sha256")
    assert attempt_token(secret, "ï1", "step", 3) == base64.urlsafe_b64encode(expected).rstrip(b"=").decode()


def test_hs256_tokens_still_verify_and_tampering_is_refused() -> None:
    keys = Keys(secret=b"k" * 32)
    token = issue("alice", "t1", ["r"], 60, keys)
    now = time.time()
    assert verify_token(token, keys, now).name == "alice"
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    with pytest.raises(AuthError, match="signature"):
        verify_token(forged, keys, now)
    with pytest.raises(AuthError, match="signature"):
        verify_token(token, Keys(secret=b"z" * 32), now)


def test_threads_agree() -> None:
    key, out, errors = b"t" * 40, [], []

    def work(n: int) -> None:
        for i in range(500):
            msg = f"{n}-{i}".encode()
            if hmac_sha256(key, msg) != hmac.digest(key, msg, "sha256"):
                errors.append(msg)
        out.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == [0, 1, 2, 3] and errors == []


def test_bytearray_and_memoryview_keys() -> None:
    key = b"q" * 33
    expected = hmac.digest(key, b"m", "sha256")
    assert hmac_sha256(bytearray(key), b"m") == expected
    assert hmac_sha256(memoryview(key), b"m") == expected  # type: ignore[arg-type]
