"""Command, principal and attempt tokens: every way a forged or reused token must be refused.

Each rejection test asserts the ``Unauthenticated`` code and the part of the reason that names
the failed check, so a check that silently stopped running (and let another one catch the
token by luck) fails here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from kflow.security.principal import AuthError, Principal
from kflow.security.tokens import (
    _PRINCIPALS,
    _PRINCIPALS_KEPT,
    COMMAND_HEADER,
    KeyConfigError,
    Keys,
    ReplayCache,
    _b64url_decode,
    attempt_token,
    check_attempt_token,
    command_digest,
    issue,
    load_jwks,
    sign_command,
    verify_command,
    verify_token,
)

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
NOW = 1_700_000_000.0
KEY, VALUE = b"order-42", b"\xc3\x01 an avro command"
ALICE = Principal("alice", "acme", frozenset({"operator"}))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict:
    algo = jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    return {**json.loads(algo.to_jwk(private.public_key())), "kid": kid, "use": "sig"}


def verifier(*privates: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Keys:
    """Keys holding only the public halves, as an engine verifying against a JWKS file does."""
    return Keys(jwks=load_jwks({"keys": [public_jwk(p, f"k{i}") for i, p in enumerate(privates)]}))


def hs256() -> Keys:
    return Keys(secret=SECRET)


def command(keys: Keys, who: Principal = ALICE, ttl_s: float = 60,
            key: bytes = KEY, value: bytes = VALUE) -> str:
    return sign_command(key, value, who, keys, ttl_s, now=NOW)


def rejected(header: object, keys: Keys, *, key: bytes = KEY, value: bytes = VALUE, now: float = NOW + 1,
             seen: ReplayCache | None = None) -> str:
    with pytest.raises(AuthError) as info:
        verify_command(header, key, value, keys, now, seen if seen is not None else ReplayCache())
    assert info.value.code == "Unauthenticated"
    return info.value.reason


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict, claims: dict, sign_with: bytes | None = None) -> str:
    """A token assembled by hand, as an attacker would: HMAC-SHA256 with any bytes, or no signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = b"" if sign_with is None else hmac.new(sign_with, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def valid_claims(**over: object) -> dict:
    return {"sub": "alice", "tenant": "acme", "roles": [], "iat": int(NOW), "exp": int(NOW) + 60, "jti": "j-1",
            "dig": command_digest(KEY, VALUE), **over}


# --------------------------------------------------------------------------- happy paths


def test_hs256_command_round_trip_returns_the_principal() -> None:
    keys = hs256()
    assert verify_command(command(keys), KEY, VALUE, keys, NOW + 1, ReplayCache()) == ALICE


def test_rs256_command_verified_against_the_jwks_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    token = command(Keys(signing_key=rsa_key))
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert verify_command(token, KEY, VALUE, verifier(rsa_key), NOW + 1, ReplayCache()).name == "alice"


def test_es256_command_verified_against_the_jwks_public_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = command(Keys(signing_key=ec_key))
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert verify_command(token, KEY, VALUE, verifier(ec_key), NOW + 1, ReplayCache()).tenant == "acme"


def test_header_value_may_arrive_as_kafka_header_bytes() -> None:
    keys = hs256()
    headers = [(COMMAND_HEADER, command(keys).encode())]
    assert verify_command(dict(headers)[COMMAND_HEADER], KEY, VALUE, keys, NOW + 1, ReplayCache()).name == "alice"


def test_a_command_signed_from_a_principal_token_carries_its_identity_and_never_outlives_it() -> None:
    keys = hs256()
    principal_token = issue("bob", "globex", ["viewer", "operator"], ttl_s=30, keys=keys, now=NOW)
    token = sign_command(KEY, VALUE, principal_token, keys, ttl_s=3600, now=NOW)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["exp"] == NOW + 30 and claims["dig"] == command_digest(KEY, VALUE)
    assert verify_command(token, KEY, VALUE, keys, NOW + 1, ReplayCache()) == \
        Principal("bob", "globex", frozenset({"viewer", "operator"}))
    assert "expired" in rejected(token, keys, now=NOW + 31)


def test_issue_sets_the_documented_claims() -> None:
    token = issue("alice", "acme", ["b", "a", "a"], ttl_s=3600, keys=hs256(), now=NOW)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == "alice" and claims["tenant"] == "acme" and claims["roles"] == ["a", "b"]
    assert claims["iat"] == NOW and claims["exp"] == NOW + 3600 and claims["jti"]
    assert verify_token(token, hs256(), NOW + 10) == Principal("alice", "acme", frozenset({"a", "b"}))


def test_every_token_gets_a_fresh_id() -> None:
    keys = hs256()
    ids = {jwt.decode(command(keys), SECRET, algorithms=["HS256"], options={"verify_exp": False})["jti"]
           for _ in range(20)}
    assert len(ids) == 20


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("header", [None, b"", ""])
def test_unsigned_command_is_rejected(header: object) -> None:
    assert "there is none" in rejected(header, hs256())


HS256_HEAD = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()


@pytest.mark.parametrize("header", ["abc", "a.b.c", "a.b", "....", "ü.ü.ü", b"\xff\xfe.x.y", "x" * 9000, "WzFd.e30.",
                                    f"{HS256_HEAD}.!!!!.x", f"{HS256_HEAD}.e30"])
def test_malformed_token_is_rejected(header: object) -> None:
    reason = rejected(header, hs256())
    assert "malformed" in reason or "at most" in reason


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"claims"'])
def test_a_correctly_signed_token_whose_claims_are_not_an_object_is_malformed(payload: bytes) -> None:
    signing_input = f"{HS256_HEAD}.{b64(payload)}"
    token = f"{signing_input}.{b64(hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest())}"
    assert "malformed" in rejected(token, hs256())


def test_expired_command_is_rejected_at_and_after_its_expiry() -> None:
    keys = hs256()
    token = command(keys, ttl_s=60)
    assert verify_command(token, KEY, VALUE, keys, NOW + 59, ReplayCache()).name == "alice"
    assert "expired" in rejected(token, keys, now=NOW + 60)
    assert "expired" in rejected(token, keys, now=NOW + 10_000)


def test_tampered_value_is_rejected() -> None:
    keys = hs256()
    assert "changed" in rejected(command(keys), keys, value=VALUE + b"x")


def test_tampered_key_is_rejected() -> None:
    keys = hs256()
    assert "changed" in rejected(command(keys), keys, key=b"order-43")


def test_key_and_value_cannot_trade_bytes() -> None:
    """The 0x00 separator: (b"ab", b"c") and (b"a", b"bc") have different digests."""
    assert command_digest(b"ab", b"c") != command_digest(b"a", b"bc")
    keys = hs256()
    assert "changed" in rejected(command(keys, key=b"ab", value=b"c"), keys, key=b"a", value=b"bc")


def test_tampered_claims_break_the_signature() -> None:
    keys = hs256()
    head, _, sig = command(keys).split(".")
    evil = b64(json.dumps(valid_claims(sub="root", roles=["system_admin"])).encode())
    assert "not signed by a configured key" in rejected(f"{head}.{evil}.{sig}", keys)


def test_replayed_command_is_rejected_within_its_lifetime() -> None:
    keys, seen = hs256(), ReplayCache()
    token = command(keys)
    assert verify_command(token, KEY, VALUE, keys, NOW + 1, seen).name == "alice"
    assert "replayed" in rejected(token, keys, now=NOW + 2, seen=seen)
    assert "replayed" in rejected(token, keys, now=NOW + 59, seen=seen)
    assert "expired" in rejected(token, keys, now=NOW + 60, seen=seen)  # and after it, expiry refuses it


def test_a_rejected_command_does_not_burn_its_token_id() -> None:
    """Only a command that passed every other check is remembered: a tampered copy cannot block the original."""
    keys, seen = hs256(), ReplayCache()
    token = command(keys)
    rejected(token, keys, value=b"tampered", seen=seen)
    assert verify_command(token, KEY, VALUE, keys, NOW + 1, seen).name == "alice"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, valid_claims())
    assert f"names alg {alg!r}" in rejected(token, hs256())


def test_alg_none_is_rejected_by_a_jwks_verifier_too(rsa_key: rsa.RSAPrivateKey) -> None:
    token = forge({"alg": "none"}, valid_claims())
    assert "names alg 'none'" in rejected(token, verifier(rsa_key))


def test_a_missing_or_non_string_alg_is_rejected() -> None:
    assert "names alg None" in rejected(forge({"typ": "JWT"}, valid_claims(), SECRET), hs256())
    assert "names alg ['HS256']" in rejected(forge({"alg": ["HS256"]}, valid_claims(), SECRET), hs256())


def test_hs256_signed_with_the_wrong_secret_is_rejected() -> None:
    token = command(Keys(secret=OTHER_SECRET))
    assert "not signed by a configured key" in rejected(token, hs256())


def test_rs256_signed_with_the_wrong_key_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "not signed by a configured key" in rejected(command(Keys(signing_key=intruder)), verifier(rsa_key))


def test_es256_signed_with_the_wrong_key_is_rejected(ec_key: ec.EllipticCurvePrivateKey) -> None:
    intruder = ec.generate_private_key(ec.SECP256R1())
    assert "not signed by a configured key" in rejected(command(Keys(signing_key=intruder)), verifier(ec_key))


def public_pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_alg_confusion_hs256_signed_with_the_public_key_against_a_jwks_verifier(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic attack: HMAC the token with the (public) RSA key and hope the verifier uses it as a secret."""
    for pem in (public_pem(rsa_key), public_pem(rsa_key).strip()):
        token = forge({"alg": "HS256", "typ": "JWT"}, valid_claims(), sign_with=pem)
        assert "expected a token signed with RS256, but it names alg 'HS256'" in rejected(token, verifier(rsa_key))


def test_alg_confusion_when_hs256_is_also_allowed_uses_only_the_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    both = Keys(secret=SECRET, jwks=verifier(rsa_key).jwks)
    token = forge({"alg": "HS256", "typ": "JWT"}, valid_claims(), sign_with=public_pem(rsa_key))
    assert "not signed by a configured key" in rejected(token, both)
    assert verify_command(command(hs256()), KEY, VALUE, both, NOW + 1, ReplayCache()).name == "alice"
    assert verify_command(command(Keys(signing_key=rsa_key)), KEY, VALUE, both, NOW + 1, ReplayCache()).name == "alice"


def test_an_algorithm_the_keys_do_not_have_is_rejected(rsa_key: rsa.RSAPrivateKey,
                                                       ec_key: ec.EllipticCurvePrivateKey) -> None:
    assert "names alg 'RS256'" in rejected(command(Keys(signing_key=rsa_key)), hs256())
    assert "names alg 'ES256'" in rejected(command(Keys(signing_key=ec_key)), verifier(rsa_key))
    assert "names alg 'HS512'" in rejected(forge({"alg": "HS512"}, valid_claims(), SECRET), hs256())


def test_es256_header_on_an_rs256_key_is_not_tried(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """With keys of both algorithms, a token is checked only with keys of the algorithm it names."""
    both = verifier(rsa_key, ec_key)
    token = command(Keys(signing_key=ec_key))
    _, claims, sig = token.split(".")
    relabelled = f"{b64(json.dumps({'alg': 'RS256', 'typ': 'JWT'}).encode())}.{claims}.{sig}"
    assert "not signed by a configured key" in rejected(relabelled, both)


def test_an_unknown_key_id_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(valid_claims(), rsa_key, algorithm="RS256", headers={"kid": "someone-else"})
    assert "no RS256 key has kid 'someone-else'" in rejected(token, verifier(rsa_key))
    token = jwt.encode(valid_claims(), rsa_key, algorithm="RS256", headers={"kid": "k0"})
    assert verify_command(token, KEY, VALUE, verifier(rsa_key), NOW + 1, ReplayCache()).name == "alice"


def test_no_configured_keys_verify_nothing() -> None:
    assert "none is: set KFLOW_JWT_SECRET" in rejected(command(hs256()), Keys())


@pytest.mark.parametrize("missing", ["sub", "tenant", "jti", "exp", "iat"])
def test_a_signed_token_missing_a_claim_is_rejected(missing: str) -> None:
    claims = valid_claims()
    del claims[missing]
    assert repr(missing) in rejected(jwt.encode(claims, SECRET, algorithm="HS256"), hs256())


@pytest.mark.parametrize("claim,value", [("sub", ""), ("tenant", 7), ("roles", "admin"), ("roles", [1]), ("exp", "soon"),
                                         ("nbf", NOW + 100)])
def test_a_signed_token_with_a_bad_claim_is_rejected(claim: str, value: object) -> None:
    token = jwt.encode(valid_claims(**{claim: value}), SECRET, algorithm="HS256")
    assert claim in rejected(token, hs256())


def test_a_token_for_another_audience_is_rejected() -> None:
    token = jwt.encode(valid_claims(aud="another-service"), SECRET, algorithm="HS256")
    assert "audience" in rejected(token, hs256())


def test_a_principal_token_is_not_a_command_token() -> None:
    token = issue("alice", "acme", [], ttl_s=60, keys=hs256(), now=NOW)
    assert "'dig'" in rejected(token, hs256())


def test_a_command_token_is_not_a_principal_token() -> None:
    """Command tokens are readable by every consumer of the commands topic: they must not open the API."""
    keys = hs256()
    with pytest.raises(AuthError, match="command token"):
        verify_token(command(keys), keys, NOW + 1)
    with pytest.raises(AuthError, match="command token"):
        sign_command(KEY, b"other", command(keys), keys, 60, now=NOW)


def test_signing_from_an_invalid_principal_token_fails() -> None:
    keys = hs256()
    expired = issue("alice", "acme", [], ttl_s=10, keys=keys, now=NOW - 100)
    with pytest.raises(AuthError, match="expired"):
        sign_command(KEY, VALUE, expired, keys, 60, now=NOW)
    forged = issue("alice", "acme", ["system_admin"], ttl_s=60, keys=Keys(secret=OTHER_SECRET), now=NOW)
    with pytest.raises(AuthError, match="not signed by a configured key"):
        sign_command(KEY, VALUE, forged, keys, 60, now=NOW)


def test_checks_use_the_given_now_not_the_wall_clock() -> None:
    keys = hs256()
    old = sign_command(KEY, VALUE, Principal("alice", "acme"), keys, 60, now=1000.0)
    assert verify_command(old, KEY, VALUE, keys, 1001.0, ReplayCache()).name == "alice"


# --------------------------------------------------------------------------- keys


def test_keys_never_show_their_secrets(rsa_key: rsa.RSAPrivateKey) -> None:
    secret = b"do-not-print-this-secret-anywhere-1234"
    keys = Keys(secret=secret, signing_key=rsa_key)
    text = repr(keys) + str(keys)
    assert secret.decode() not in text and "PRIVATE" not in text and "HS256" in text and "RS256" in text


def test_keys_from_env_hs256() -> None:
    keys = Keys.from_env({"KFLOW_JWT_SECRET": SECRET.decode()})
    assert keys.algorithms == {"HS256"} and keys.signing_algorithm == "HS256"
    assert verify_command(command(keys), KEY, VALUE, hs256(), NOW + 1, ReplayCache()).name == "alice"


def test_keys_from_env_jwks_file_and_pem_signing_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public_jwk(rsa_key, "main")]}))
    pem = tmp_path / "signing.pem"
    pem.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    engine = Keys.from_env({"KFLOW_JWKS_FILE": str(jwks)})
    client = Keys.from_env({"KFLOW_SIGNING_KEY": str(pem)})
    assert engine.algorithms == {"RS256"} and engine.signing_algorithm is None
    assert client.signing_algorithm == "RS256"
    assert verify_command(command(client), KEY, VALUE, engine, NOW + 1, ReplayCache()).name == "alice"


def test_keys_from_env_signing_secret_overrides_the_jwt_secret_for_signing() -> None:
    keys = Keys.from_env({"KFLOW_JWT_SECRET": SECRET.decode(), "KFLOW_SIGNING_KEY": OTHER_SECRET.decode()})
    assert "not signed by a configured key" in rejected(command(keys), hs256())
    assert verify_command(command(keys), KEY, VALUE, Keys(secret=OTHER_SECRET), NOW + 1, ReplayCache())


def test_empty_environment_gives_keys_that_verify_nothing_and_cannot_sign() -> None:
    keys = Keys.from_env({})
    assert keys.algorithms == frozenset() and keys.signing_algorithm is None
    with pytest.raises(KeyConfigError, match="KFLOW_JWT_SECRET"):
        issue("alice", "acme", [], 60, keys)


def test_a_short_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(KeyConfigError) as info:
        Keys.from_env({"KFLOW_JWT_SECRET": "hunter2"})
    assert "at least 32 bytes" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(KeyConfigError) as info:
        Keys.from_env({"KFLOW_SIGNING_KEY": "/no/such/key.pem"})
    assert "neither an existing PEM file" in str(info.value) and "/no/such" not in str(info.value)


def test_unusable_key_files_are_clear_errors(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(KeyConfigError, match="not valid JSON"):
        Keys.from_env({"KFLOW_JWKS_FILE": str(bad_json)})
    with pytest.raises(KeyConfigError, match="No such file"):
        Keys.from_env({"KFLOW_JWKS_FILE": str(tmp_path / "missing.json")})
    not_pem = tmp_path / "key.pem"
    not_pem.write_text("not a key")
    with pytest.raises(KeyConfigError, match="not an unencrypted PEM private key"):
        Keys.from_env({"KFLOW_SIGNING_KEY": str(not_pem)})


def test_a_jwks_needs_a_public_signature_key(rsa_key: rsa.RSAPrivateKey) -> None:
    oct_key = {"kty": "oct", "k": b64(SECRET), "kid": "shared"}
    with pytest.raises(KeyConfigError, match="symmetric key"):
        load_jwks({"keys": [oct_key]})
    with pytest.raises(KeyConfigError, match="'keys' list"):
        load_jwks({"key": []})
    keys = load_jwks({"keys": [oct_key, {**public_jwk(rsa_key, "enc"), "use": "enc"}, public_jwk(rsa_key, "sig")]})
    assert [k.key_id for k in keys] == ["sig"]


def test_weak_signing_keys_are_refused() -> None:
    with pytest.raises(KeyConfigError, match="2048"):
        Keys(signing_key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(KeyConfigError, match="P-256"):
        Keys(signing_key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(KeyConfigError, match="32 bytes"):
        Keys(secret=b"short")


# --------------------------------------------------------------------------- replay cache


def test_replay_cache_forgets_ids_once_they_expire() -> None:
    seen = ReplayCache()
    seen.add("a", exp=100, now=0)
    assert "a" in seen
    seen.add("b", exp=200, now=100)  # "a" expired at 100
    assert "a" not in seen and len(seen) == 1


def test_full_replay_cache_fails_closed() -> None:
    seen = ReplayCache(capacity=2)
    seen.add("a", exp=100, now=0)
    seen.add("b", exp=200, now=0)
    seen.add("c", exp=300, now=0)  # forgets "a" early
    assert len(seen) == 2 and "a" not in seen
    with pytest.raises(AuthError, match="replay cache is full"):
        seen.add("a", exp=100, now=1)  # might be a replay of the forgotten "a"
    seen.add("d", exp=400, now=1)  # tokens expiring later are still accepted


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 120), min_size=1),
       st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20)), max_size=60), st.integers(1, 4))
def test_replay_cache_never_accepts_a_token_twice(expiry: dict[str, int], ops: list[tuple[int, int]],
                                                  capacity: int) -> None:
    """However small the cache, no token is accepted twice (a token's jti and exp come together, signed)."""
    tokens = sorted(expiry.items())
    seen, now, accepted = ReplayCache(capacity), 0, set()
    for pick, step in ops:
        now += step
        jti, exp = tokens[pick % len(tokens)]
        if exp <= now:
            continue  # verify_command refuses an expired token before it looks at the cache
        try:
            seen.add(jti, exp, now)
        except AuthError:
            continue
        assert jti not in accepted, f"{jti} accepted twice"
        accepted.add(jti)
        assert len(seen) <= capacity


# --------------------------------------------------------------------------- attempt tokens


def test_attempt_token_checks_only_its_own_attempt() -> None:
    token = attempt_token(SECRET, "order-42", "charge", 3)
    assert check_attempt_token(SECRET, "order-42", "charge", 3, token)
    assert check_attempt_token(SECRET, "order-42", "charge", 3, token.encode())
    assert not check_attempt_token(SECRET, "order-42", "charge", 2, token)
    assert not check_attempt_token(SECRET, "order-42", "refund", 3, token)
    assert not check_attempt_token(SECRET, "order-43", "charge", 3, token)
    assert not check_attempt_token(OTHER_SECRET, "order-42", "charge", 3, token)


@pytest.mark.parametrize("token", [None, "", b"", "garbage", "ü" * 43])
def test_a_missing_or_garbage_attempt_token_is_refused(token: object) -> None:
    assert not check_attempt_token(SECRET, "order-42", "charge", 3, token)


def test_attempt_token_fields_cannot_be_shifted() -> None:
    assert attempt_token(SECRET, "ab", "c", 1) != attempt_token(SECRET, "a", "bc", 1)
    assert attempt_token(SECRET, "a", "b", 11) != attempt_token(SECRET, "a", "b1", 1)


def test_attempt_token_is_base64url_hmac_sha256() -> None:
    token = attempt_token(SECRET, "i", "a", 1)
    assert len(token) == 43 and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# --------------------------------------------------------------------------- the HS256 fast path


def _pyjwt_verdict(token: str, secret: bytes) -> object:
    try:
        return jwt.PyJWT(options={"enforce_minimum_key_length": True}).decode(
            token, secret, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    except jwt.InvalidSignatureError:
        return "bad signature"
    except jwt.PyJWTError:
        return "refused"


def _fast_verdict(token: str, secret: bytes) -> object:
    from kflow.security.tokens import _decode_hs256

    try:
        got = _decode_hs256(token, [secret])
    except AuthError:
        return "bad signature"
    return "refused" if got is None else got  # None: left to PyJWT, which refuses what it is given here


_claim_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                          st.lists(st.text(max_size=4), max_size=3))


@settings(max_examples=200)
@given(claims=st.dictionaries(st.sampled_from(["sub", "tenant", "roles", "iat", "exp", "jti", "dig", "x"]),
                              _claim_values, max_size=8),
       signer=st.sampled_from([SECRET, OTHER_SECRET]), tamper=st.booleans())
def test_the_hs256_fast_path_accepts_exactly_what_pyjwt_accepts(claims: dict, signer: bytes, tamper: bool) -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, claims, sign_with=signer)
    if tamper:  # flip one character of the signature
        head, body, sig = token.split(".")
        token = f"{head}.{body}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    assert _fast_verdict(token, SECRET) == _pyjwt_verdict(token, SECRET)


def test_a_token_with_an_audience_takes_pyjwts_path_and_its_error() -> None:
    keys = hs256()
    token = forge({"alg": "HS256", "typ": "JWT"}, valid_claims(aud="someone"), sign_with=SECRET)
    assert "'aud' claim" in rejected(token, keys)


_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                            lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                            max_leaves=6)


@settings(max_examples=200)
@given(claims=st.dictionaries(st.text(max_size=6), _json_values, max_size=8),
       secret=st.sampled_from([SECRET, OTHER_SECRET]))
def test_hs256_tokens_are_signed_byte_for_byte_as_pyjwt_signs_them(claims: dict, secret: bytes) -> None:
    from kflow.security.tokens import _encode_hs256

    assert _encode_hs256(claims, secret) == jwt.encode(claims, secret, algorithm="HS256")


def test_command_tokens_signed_with_a_secret_verify_with_pyjwt() -> None:
    token = sign_command(b"k", b"v", {"sub": "alice", "tenant": "acme", "roles": ["r"]}, hs256(), 60, now=1000.0)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert (claims["sub"], claims["tenant"], claims["roles"], claims["exp"]) == ("alice", "acme", ["r"], 1060)


# --------------------------------------------------------------------------- the engine's fast path


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_fast_base64url_decoding_reads_what_the_standard_library_reads(raw: bytes) -> None:
    text = b64(raw)
    assert _b64url_decode(text) == base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == raw


@pytest.mark.parametrize("over", [{"big": 2 ** 70}, {"roles": ["ops", "on-call"]}, {"nested": {"a": [1, 2.5, None]}}])
def test_claims_the_fast_path_hands_to_pyjwt_verify_the_same(over: dict) -> None:
    """A claim orjson refuses (an integer beyond 64 bits) goes PyJWT's way; the answer is the same."""
    token = forge({"alg": "HS256", "typ": "JWT"}, valid_claims(**over), SECRET)
    who = verify_command(token, KEY, VALUE, hs256(), NOW + 1, ReplayCache())
    assert (who.name, who.tenant) == ("alice", "acme")
    assert who.roles == frozenset(over.get("roles", []))


def test_principals_are_shared_per_claims_and_never_mixed_up() -> None:
    first = verify_command(command(hs256()), KEY, VALUE, hs256(), NOW + 1, ReplayCache())
    again = verify_command(command(hs256()), KEY, VALUE, hs256(), NOW + 1, ReplayCache())
    other = verify_command(command(hs256(), Principal("alice", "acme", frozenset({"admin"}))), KEY, VALUE, hs256(),
                           NOW + 1, ReplayCache())
    elsewhere = verify_command(command(hs256(), Principal("alice", "globex", frozenset({"operator"}))), KEY, VALUE,
                               hs256(), NOW + 1, ReplayCache())
    assert first is again and first == ALICE
    assert other.roles == frozenset({"admin"}) and elsewhere.tenant == "globex"


def test_the_principal_cache_stays_bounded() -> None:
    for i in range(_PRINCIPALS_KEPT + 10):
        verify_command(command(hs256(), Principal(f"p{i}", "acme")), KEY, VALUE, hs256(), NOW + 1, ReplayCache())
    assert len(_PRINCIPALS) <= _PRINCIPALS_KEPT
