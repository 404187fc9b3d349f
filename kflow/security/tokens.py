"""Tokens: who sent a command, proven by a signature over the record it rides on.

Three kinds of token live here, all built on PyJWT and HMAC-SHA256:

* **Principal tokens** (:func:`issue`, :func:`verify_token`): a JWT naming a principal, its
  tenant and roles, for the HTTP API and for clients to derive command tokens from.
* **Command tokens** (:func:`sign_command`, :func:`verify_command`): a short-lived JWT in the
  :data:`COMMAND_HEADER` record header that binds the principal, tenant, expiry, a token id
  (``jti``) and ``dig`` = base64url(sha256(key || 0x00 || value)) of the Kafka record. Any
  producer in any language can make one; the engine verifies it before ``decide``, so a
  changed key or value, an expired token or a second use of the same token is refused.
* **Attempt tokens** (:func:`attempt_token`, :func:`check_attempt_token`): an HMAC the engine
  puts on every task over (instance, activity, attempt); a result must bring it back, so
  whoever can write to ``commands`` still cannot forge another attempt's result.

The algorithm a token names in its header is never trusted on its own: it must be one the
configured :class:`Keys` can verify (HS256 for the shared secret, RS256/ES256 for the JWKS
keys), and only a key of that algorithm is tried, so ``alg: none`` and HS256-with-a-public-key
confusion are refused before any signature is checked. Every check takes ``now`` (epoch
seconds, as JWT claims are) as an argument; nothing here reads the clock except :func:`issue`
and :func:`sign_command` when no ``now`` is given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kflow.model.errors import KflowError
from kflow.security.principal import AuthError, Principal

__all__ = [
    "ATTEMPT_HEADER",
    "COMMAND_HEADER",
    "MIN_SECRET_BYTES",
    "KeyConfigError",
    "Keys",
    "CommandSigner",
    "ReplayCache",
    "SigningKey",
    "attempt_token",
    "check_attempt_token",
    "command_digest",
    "hmac_sha256",
    "issue",
    "load_jwks",
    "load_jwks_file",
    "replayed",
    "sign_command",
    "verify_command",
    "verify_command_claims",
    "verify_token",
]

log = logging.getLogger(__name__)

#: The record header that carries a command token.
COMMAND_HEADER = "kflow.auth"
#: The record header in which a worker returns a task's attempt token with the attempt's reports.
ATTEMPT_HEADER = "kflow.attempt"
#: Shortest HS256 secret accepted: RFC 7518 asks for a key at least as long as the hash.
MIN_SECRET_BYTES = 32
#: Longest token looked at; anything longer is refused before it is parsed.
MAX_TOKEN_BYTES = 8192

_HS256, _RS256, _ES256 = "HS256", "RS256", "ES256"
#: The only algorithms a JWKS key may verify (an ``oct`` key in a JWKS would be a shared secret).
_JWKS_ALGORITHMS = frozenset({_RS256, _ES256})
_MIN_RSA_BITS = 2048
_ATTEMPT_DOMAIN = b"kflow.attempt.v1"
#: What a progress token is the HMAC of, under its attempt token (see :func:`progress_token`).
_PROGRESS_DOMAIN = b"kflow.progress.v1"
# Expiry is checked against the caller's ``now``, so PyJWT must not look at its own clock; an
# ``aud`` claim is still refused, as no audience is configured.
_DECODE_OPTIONS: Any = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}
_JWT = jwt.PyJWT(options={"enforce_minimum_key_length": True})

#: A key that signs: an HS256 secret, or an RSA (RS256) or P-256 (ES256) private key.
SigningKey = bytes | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyConfigError(KflowError):
    """The configured keys cannot be used; the message names the variable, never the secret."""


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, eq=False, repr=False)
class Keys:
    """The keys a process verifies and signs tokens with.

    Attributes:
        secret: The HS256 shared secret (verifies, and signs when ``signing_key`` is unset).
        jwks: Public keys (RS256/ES256) that verify tokens, e.g. an OIDC provider's JWKS.
        signing_key: What :func:`issue` and :func:`sign_command` sign with: an HS256 secret or
            an RSA / P-256 private key whose public half is in the verifiers' JWKS.
    """

    secret: bytes | None = None
    jwks: tuple[jwt.PyJWK, ...] = ()
    signing_key: SigningKey | None = None
    _signer: tuple[Any, str] | None = field(init=False, default=None)
    _algorithms: frozenset[str] = field(init=False, default=frozenset())  # computed once: read per token

    def __post_init__(self) -> None:
        if self.secret is not None:
            _check_secret(self.secret, "the JWT secret")
        for k in self.jwks:
            if k.algorithm_name not in _JWKS_ALGORITHMS:
                raise KeyConfigError(f"a JWKS key must be RS256 or ES256, got {k.algorithm_name}")
        signer = _signer_for(self.signing_key) if self.signing_key is not None else None
        if signer is None and self.secret is not None:
            signer = (self.secret, _HS256)
        object.__setattr__(self, "_signer", signer)
        found = {k.algorithm_name for k in self.jwks} | ({_HS256} if self.secret is not None else set())
        object.__setattr__(self, "_algorithms", frozenset(found))

    def __repr__(self) -> str:
        return (f"Keys(verifies={sorted(self.algorithms)}, jwks={len(self.jwks)} key(s), "
                f"signs={self._signer[1] if self._signer else None})")

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms a token may name: those of the configured verification keys."""
        return self._algorithms

    @property
    def signing_algorithm(self) -> str | None:
        """The algorithm tokens are signed with, or None when these keys cannot sign."""
        return self._signer[1] if self._signer else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keys:
        """Keys from ``KFLOW_JWT_SECRET``, ``KFLOW_JWKS_FILE`` and ``KFLOW_SIGNING_KEY``.

        ``KFLOW_SIGNING_KEY`` is the path of a PEM private key file (RS256 or ES256) when such a
        file exists, else an HS256 secret. Unset variables contribute nothing: keys from an
        empty environment verify nothing and cannot sign.

        Raises:
            KeyConfigError: a variable is set but unusable (short secret, unreadable or invalid
                JWKS file, a PEM that is not an RSA or P-256 private key).
        """
        env = os.environ if environ is None else environ
        return cls.from_values(env.get("KFLOW_JWT_SECRET"), env.get("KFLOW_JWKS_FILE"), env.get("KFLOW_SIGNING_KEY"))

    @classmethod
    def from_values(cls, jwt_secret: str | None, jwks_file: str | None, signing_key: str | None) -> Keys:
        """Keys from the values of ``KFLOW_JWT_SECRET``, ``KFLOW_JWKS_FILE`` and ``KFLOW_SIGNING_KEY``
        (as a process's settings hold them); empty or None values contribute nothing.

        Raises:
            KeyConfigError: as :meth:`from_env`.
        """
        return cls(
            secret=_secret_bytes(jwt_secret, "KFLOW_JWT_SECRET") if jwt_secret else None,
            jwks=load_jwks_file(jwks_file) if jwks_file else (),
            signing_key=_signing_key_from_env(signing_key) if signing_key else None,
        )

    def verifiers(self, alg: str, kid: object) -> list[Any]:
        """The keys that may verify a token of ``alg`` (and ``kid``, when the token names one)."""
        if alg == _HS256:
            return [self.secret] if self.secret is not None else []
        return [k for k in self.jwks if k.algorithm_name == alg and (kid is None or k.key_id == kid)]

    def signer(self) -> tuple[Any, str]:
        """The signing key and its algorithm.

        Raises:
            KeyConfigError: these keys cannot sign.
        """
        if self._signer is None:
            raise KeyConfigError("cannot sign tokens: set KFLOW_JWT_SECRET (HS256) or KFLOW_SIGNING_KEY "
                                 "(an HS256 secret or a PEM private key file)")
        return self._signer


def _check_secret(secret: bytes, what: str) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyConfigError(f"{what} must be at least {MIN_SECRET_BYTES} bytes long, got {len(secret)}")


def _secret_bytes(text: str, variable: str) -> bytes:
    raw = text.encode("utf-8")
    _check_secret(raw, variable)
    return raw


def _signer_for(key: SigningKey) -> tuple[Any, str]:
    """The algorithm a signing key implies; refuse weak or unsupported keys."""
    if isinstance(key, bytes):
        _check_secret(key, "the HS256 signing key")
        return key, _HS256
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise KeyConfigError(f"an RSA signing key must have at least {_MIN_RSA_BITS} bits, got {key.key_size}")
        return key, _RS256
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyConfigError(f"an EC signing key must be on P-256 (ES256), got {key.curve.name}")
        return key, _ES256
    raise KeyConfigError(f"a signing key must be bytes, an RSA or a P-256 private key, got {type(key).__name__}")


def _signing_key_from_env(value: str) -> SigningKey:
    """``KFLOW_SIGNING_KEY``: a PEM private key file when the path exists, else an HS256 secret."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # a secret too long or odd to be a path
        is_file = False
    if not is_file:
        if len(value.encode("utf-8")) < MIN_SECRET_BYTES:
            raise KeyConfigError(f"KFLOW_SIGNING_KEY is neither an existing PEM file nor an HS256 secret of at "
                                 f"least {MIN_SECRET_BYTES} bytes")
        return value.encode("utf-8")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(f"KFLOW_SIGNING_KEY file {path} is not an unencrypted PEM private key: "
                             f"{type(exc).__name__}") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise KeyConfigError(f"KFLOW_SIGNING_KEY file {path} must hold an RSA or P-256 key, got {type(key).__name__}")
    return key


def load_jwks(doc: Mapping[str, Any], source: str = "JWKS") -> tuple[jwt.PyJWK, ...]:
    """The RS256/ES256 signature keys of a JWKS document; other keys are skipped with a warning.

    Raises:
        KeyConfigError: the document has no ``keys`` list or no usable key.
    """
    raw = doc.get("keys")
    if not isinstance(raw, list):
        raise KeyConfigError(f"{source}: expected an object with a 'keys' list")
    usable: list[jwt.PyJWK] = []
    skipped: list[str] = []
    for i, entry in enumerate(raw):
        why = _jwk_problem(entry)
        if why is None:
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                why = str(exc).split(":")[0]
            else:
                why = None if key.algorithm_name in _JWKS_ALGORITHMS else f"algorithm {key.algorithm_name} is not RS256/ES256"
                if why is None:
                    usable.append(key)
        if why is not None:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            skipped.append(f"key {i}" + (f" (kid {kid})" if kid else "") + f": {why}")
    if not usable:
        raise KeyConfigError(f"{source}: no usable RS256/ES256 key" + (f" ({'; '.join(skipped)})" if skipped else ""))
    for reason in skipped:
        log.warning("%s: skipped %s", source, reason)
    return tuple(usable)


def _jwk_problem(entry: Any) -> str | None:
    """Why a JWKS entry cannot verify signatures, before PyJWT parses it."""
    if not isinstance(entry, dict):
        return "not an object"
    if entry.get("kty") == "oct":
        return "a symmetric key does not belong in a JWKS of public keys"
    if entry.get("use", "sig") != "sig":
        return f"use is {entry.get('use')!r}, not 'sig'"
    return None


def load_jwks_file(path: str | os.PathLike[str]) -> tuple[jwt.PyJWK, ...]:
    """:func:`load_jwks` of a JSON file (``KFLOW_JWKS_FILE``).

    Raises:
        KeyConfigError: the file cannot be read, is not JSON, or has no usable key.
    """
    source = f"KFLOW_JWKS_FILE {path}"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyConfigError(f"{source}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyConfigError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise KeyConfigError(f"{source}: expected a JSON object with a 'keys' list")
    return load_jwks(doc, source)


# --------------------------------------------------------------------------- principal tokens


def issue(principal: str, tenant: str, roles: Iterable[str], ttl_s: float, keys: Keys, *,
          now: float | None = None) -> str:
    """Mint a principal token (claims ``sub``, ``tenant``, ``roles``, ``iat``, ``exp``, ``jti``).

    Args:
        principal: The principal's name.
        tenant: Its tenant.
        roles: Its role names.
        ttl_s: How long the token is valid, in seconds.
        keys: Keys that can sign.
        now: Epoch seconds to issue at (default: the wall clock).

    Raises:
        ValueError: an empty principal or tenant, or a non-positive ``ttl_s``.
        KeyConfigError: ``keys`` cannot sign.
    """
    if not principal or not tenant:
        raise ValueError("a token needs a principal and a tenant")
    if not ttl_s > 0:
        raise ValueError(f"expected a positive ttl, but got {ttl_s}s")
    iat = int(time.time() if now is None else now)
    claims = {"sub": principal, "tenant": tenant, "roles": sorted(set(roles)),
              "iat": iat, "exp": iat + math.ceil(ttl_s), "jti": _new_jti()}
    return _sign(claims, keys)


def verify_token(token: str | bytes | None, keys: Keys, now: float, *, audience: str | None = None,
                 issuer: str | None = None) -> Principal:
    """Verify a principal token (e.g. an HTTP bearer token) and return who it names.

    A command token is refused here: it is visible to every reader of the commands topic, so it
    must not open the HTTP API. With ``audience`` (``issuer``) given, the token must carry that
    ``aud`` (``iss``) claim, as an OIDC provider's tokens do; without ``audience``, a token with
    an ``aud`` claim is refused.

    Raises:
        AuthError: ``Unauthenticated``, with the reason.
    """
    claims = _verified_claims(_token_text(token), keys, now, audience=audience, issuer=issuer)
    if "dig" in claims:
        raise _unauthenticated("expected a principal token, but this is a command token")
    return _principal(claims)


def _new_jti() -> str:
    return secrets.token_urlsafe(16)


def _sign(claims: dict[str, Any], keys: Keys) -> str:
    key, alg = keys.signer()
    if alg == _HS256 and isinstance(key, bytes):
        return _encode_hs256(claims, key)
    return _JWT.encode(claims, key, algorithm=alg)


#: The JOSE header PyJWT writes for an HS256 token (keys sorted, compact), base64url-encoded.
_HS256_HEADER = base64.urlsafe_b64encode(
    json.dumps({"alg": _HS256, "typ": "JWT"}, separators=(",", ":"), sort_keys=True).encode()).rstrip(b"=").decode()


def _encode_hs256(claims: dict[str, Any], secret: bytes) -> str:
    """The HS256 token PyJWT's ``encode`` makes of ``claims``, byte for byte (compact JSON of the claims
    in their order, one :func:`hmac_sha256`), without its general path: every command a client sends is
    signed. The secret's length was checked when the :class:`Keys` were made."""
    body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    signing_input = f"{_HS256_HEADER}.{body}"
    return f"{signing_input}.{_b64(hmac_sha256(secret, signing_input.encode('ascii')))}"


# --------------------------------------------------------------------------- command tokens


def command_digest(key: bytes | None, value: bytes | None) -> str:
    """``dig`` of a record: base64url (unpadded) of sha256(key || 0x00 || value); None counts as empty."""
    h = hashlib.sha256(key or b"")
    h.update(b"\x00")
    h.update(value or b"")
    return _b64(h.digest())


def sign_command(key: bytes | None, value: bytes | None, principal_token_or_claims: str | Principal | Mapping[str, Any],
                 keys: Keys, ttl_s: float, *, now: float | None = None) -> str:
    """A command token for one record, to put in its :data:`COMMAND_HEADER` header.

    Args:
        key: The record's key (the instance id).
        value: The record's value, exactly as produced.
        principal_token_or_claims: Who sends it: a principal token (verified with ``keys``; the
            command token never outlives it), a :class:`Principal`, or claims with ``sub``,
            ``tenant`` and optional ``roles``.
        keys: Keys that can sign (and verify the principal token).
        ttl_s: How long the command stays valid, in seconds: at least as long as it may wait in
            the topic before an engine reads it.
        now: Epoch seconds to sign at (default: the wall clock).

    Raises:
        AuthError: the principal token does not verify.
        KeyConfigError: ``keys`` cannot sign.
        ValueError: a non-positive ``ttl_s``, or claims without ``sub`` and ``tenant``.
    """
    if not ttl_s > 0:
        raise ValueError(f"expected a positive ttl, but got {ttl_s}s")
    at = time.time() if now is None else now
    exp = int(at) + math.ceil(ttl_s)
    source = principal_token_or_claims
    if isinstance(source, Principal):
        who = source
    elif isinstance(source, Mapping):
        who = _principal(source)
    else:
        claims = _verified_claims(_token_text(source), keys, at)
        if "dig" in claims:
            raise _unauthenticated("expected a principal token, but this is a command token")
        who, exp = _principal(claims), min(exp, claims["exp"])
    claims = {"sub": who.name, "tenant": who.tenant, "roles": sorted(who.roles), "iat": int(at), "exp": exp,
              "jti": _new_jti(), "dig": command_digest(key, value)}
    if who.on_behalf_of:
        claims["obo"] = who.on_behalf_of
    return _sign(claims, keys)


def verify_command(header_value: str | bytes | None, key: bytes | None, value: bytes | None, keys: Keys, now: float,
                   seen: ReplayCache) -> Principal:
    """Verify the command token of one record and return its sender.

    Checks, in order: present and well-formed; its ``alg`` is one ``keys`` verify; signature;
    claims; not expired at ``now``; ``dig`` matches this key and value; its ``jti`` not seen
    before (then remembered in ``seen`` until it expires).

    Raises:
        AuthError: ``Unauthenticated``, with the reason.
    """
    who, jti, exp = verify_command_claims(header_value, key, value, keys, now)
    seen.add(jti, exp, now)
    return who


def verify_command_claims(header_value: str | bytes | None, key: bytes | None, value: bytes | None, keys: Keys,
                          now: float) -> tuple[Principal, str, float]:
    """:func:`verify_command` but the replay check: ``(sender, jti, exp)`` for the caller to check.

    Raises:
        AuthError: ``Unauthenticated``, with the reason.
    """
    claims = _verified_claims(_token_text(header_value), keys, now)
    who = _principal(claims)
    dig = claims.get("dig")
    if not isinstance(dig, str):
        raise _unauthenticated("expected a command token with a 'dig' claim, but it has none")
    if not hmac.compare_digest(dig.encode("ascii", "replace"), command_digest(key, value).encode("ascii")):
        raise _unauthenticated("expected the token's digest to match the record, but the key or value was changed")
    return who, claims["jti"], claims["exp"]


class CommandSigner:
    """Signs the command records a process produces, as the principal of its token (``KFLOW_TOKEN``).

    The principal token is verified with the local keys once, on first use; each record then gets
    a command token of its own (:func:`sign_command`), valid for ``ttl_s`` but never beyond the
    principal token. Thread-safe: verifying twice in a race gives the same answer.

    Args:
        token: The principal token.
        keys: Keys that verify the principal token and sign command tokens.
        ttl_s: How long a command stays valid: at least as long as it may wait in the topic
            before an engine reads it.
    """

    def __init__(self, token: str, keys: Keys, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"expected a positive ttl, but got {ttl_s}s")
        self._token, self.keys, self.ttl_s = token, keys, ttl_s
        self._who: tuple[Principal, float] | None = None

    def __repr__(self) -> str:
        return f"CommandSigner({self._who[0] if self._who else 'unverified'}, ttl={self.ttl_s:g}s)"

    def principal(self, now: float | None = None) -> Principal:
        """Who the commands are signed as.

        Raises:
            AuthError: the principal token does not verify (or has expired).
        """
        return self._verified(time.time() if now is None else now)[0]

    def header(self, key: bytes | None, value: bytes | None, *, now: float | None = None) -> tuple[str, bytes]:
        """The :data:`COMMAND_HEADER` header of the record with this key and value.

        Raises:
            AuthError: the principal token does not verify, or has expired.
            KeyConfigError: the keys cannot sign.
        """
        at = time.time() if now is None else now
        who, exp = self._verified(at)
        if at >= exp:
            raise _unauthenticated(f"expected KFLOW_TOKEN to be valid at {at:.0f}, but it expired at {exp:.0f}: "
                                   "issue a new one (kflow token issue)")
        token = sign_command(key, value, who, self.keys, min(self.ttl_s, exp - at), now=at)
        return COMMAND_HEADER, token.encode("ascii")

    def _verified(self, now: float) -> tuple[Principal, float]:
        if self._who is None:
            claims = _verified_claims(_token_text(self._token), self.keys, now)
            if "dig" in claims:
                raise _unauthenticated("expected KFLOW_TOKEN to be a principal token, but it is a command token")
            self._who = (_principal(claims), float(claims["exp"]))
        return self._who


def _token_text(raw: str | bytes | None) -> str:
    if raw is None or len(raw) == 0:
        raise _unauthenticated(f"expected a signed token (header {COMMAND_HEADER!r} or a bearer token), but there is none")
    if len(raw) > MAX_TOKEN_BYTES:
        raise _unauthenticated(f"expected a token of at most {MAX_TOKEN_BYTES} bytes, but it has {len(raw)}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            return bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise _unauthenticated("malformed token: not ASCII") from None
    return raw


def _verified_claims(token: str, keys: Keys, now: float, *, audience: str | None = None,
                     issuer: str | None = None) -> dict[str, Any]:
    """Check the algorithm against ``keys``, the signature, the claim types and the expiry."""
    header = _unverified_header(token)
    alg = header.get("alg")
    allowed = keys.algorithms
    if not isinstance(alg, str) or alg not in allowed:
        expected = "/".join(sorted(allowed)) or "a configured key (none is: set KFLOW_JWT_SECRET or KFLOW_JWKS_FILE)"
        raise _unauthenticated(f"expected a token signed with {expected}, but it names alg {alg!r}")
    candidates = keys.verifiers(alg, header.get("kid"))
    if not candidates:
        raise _unauthenticated(f"expected a token signed by a known key, but no {alg} key has kid {header.get('kid')!r}")
    claims = _decode(token, alg, candidates, audience, issuer)
    _check_claims(claims, now)
    return claims


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, read only to choose a key (PyJWT then checks the whole token strictly).

    Decoding just the first segment, rather than asking PyJWT for it, halves the parsing cost
    of every command; the few headers in use (one per signer's algorithm and key id) are parsed
    once and kept (read-only: callers only ``get`` from them).
    """
    head = token.split(".", 1)[0]
    header = _HEADERS.get(head)
    if header is not None:
        return header
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        raise _unauthenticated("malformed token: its header is not base64url-encoded JSON") from None
    if not isinstance(header, dict):
        raise _unauthenticated("malformed token: its header is not a JSON object")
    if len(_HEADERS) >= _HEADERS_KEPT:  # anyone may send headers: the cache stays small
        _HEADERS.clear()
    _HEADERS[head] = header
    return header


#: Parsed JOSE headers by their base64url text (see :func:`_unverified_header`), at most _HEADERS_KEPT.
_HEADERS: dict[str, dict[str, Any]] = {}
_HEADERS_KEPT = 64


def _decode(token: str, alg: str, candidates: list[Any], audience: str | None = None,
            issuer: str | None = None) -> dict[str, Any]:
    """Verify ``token`` with the first candidate key whose signature matches; only ``alg`` is allowed."""
    if alg == _HS256 and audience is None and issuer is None:
        claims = _decode_hs256(token, candidates)
        if claims is not None:
            return claims
    for k in candidates:
        try:  # a dict, or DecodeError
            return _JWT.decode(token, k, algorithms=[alg], options=_DECODE_OPTIONS, audience=audience, issuer=issuer)
        except jwt.InvalidSignatureError:
            continue
        except jwt.InvalidAudienceError:
            raise _unauthenticated(f"expected audience {audience!r}, but the token's 'aud' claim names another"
                                   if audience else "expected a token without an 'aud' claim (no audience is "
                                   "configured: set KFLOW_JWT_AUDIENCE), but it has one") from None
        except jwt.InvalidIssuerError:
            raise _unauthenticated(f"expected issuer {issuer!r}, but the token's 'iss' claim names another") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthenticated(f"expected a token with a {exc.claim!r} claim, but it has none") from None
        except jwt.DecodeError as exc:
            raise _unauthenticated(f"malformed token: {exc}") from None
        except jwt.PyJWTError as exc:
            raise _unauthenticated(f"invalid token: {exc}") from None
    raise _unauthenticated("expected a valid signature, but the token was not signed by a configured key")


def _decode_hs256(token: str, secrets_: list[Any]) -> dict[str, Any] | None:
    """The claims of an HS256 token, verified without PyJWT's general path (the engine verifies
    one token per command, and that path costs most of it); None leaves an unusual token to PyJWT.

    The signature is checked exactly as PyJWT checks it: HMAC-SHA256 of the first two segments
    under each secret, compared in constant time; a token with an ``aud`` claim, a short secret or
    anything malformed goes the general way, which reports it.

    Raises:
        AuthError: the token is well formed but no secret signed it.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(isinstance(k, (bytes, bytearray)) and len(k) >= 32 for k in secrets_):
        return None
    head, body, sig = parts
    try:
        signature = _b64url_decode(sig)
    except (ValueError, binascii.Error):
        return None
    signed = f"{head}.{body}".encode("ascii")
    if not any(hmac.compare_digest(hmac_sha256(bytes(k), signed), signature) for k in secrets_):
        raise _unauthenticated("expected a valid signature, but the token was not signed by a configured key")
    try:  # orjson: a third of json's cost; what it refuses (a 65-bit integer, NaN) goes PyJWT's way
        claims = orjson.loads(_b64url_decode(body))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(claims, dict) or "aud" in claims or any(
            name in claims and not isinstance(claims[name], str) for name in ("sub", "jti")):
        return None  # PyJWT refuses these with its own message
    return claims


def _check_claims(claims: dict[str, Any], now: float) -> None:
    for name in ("sub", "tenant", "jti"):
        if not isinstance(claims.get(name), str) or not claims[name]:
            raise _unauthenticated(f"expected a non-empty string claim {name!r}, but got {claims.get(name)!r}")
    for name in ("iat", "exp"):
        if not _is_number(claims.get(name)):
            raise _unauthenticated(f"expected a numeric claim {name!r}, but got {claims.get(name)!r}")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise _unauthenticated("expected claim 'roles' to be a list of strings")
    if now >= claims["exp"]:
        raise _unauthenticated(f"expected a token valid at {now:.0f}, but it expired at {claims['exp']}")
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_number(nbf) or now < nbf):
        raise _unauthenticated(f"expected a token valid at {now:.0f}, but its 'nbf' claim is {nbf!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _principal(claims: Mapping[str, Any]) -> Principal:
    name, tenant, roles = claims.get("sub"), claims.get("tenant"), claims.get("roles", ())
    if not isinstance(name, str) or not name or not isinstance(tenant, str) or not tenant:
        raise ValueError("claims need a non-empty 'sub' and 'tenant'")
    if isinstance(roles, str) or not all(isinstance(r, str) for r in roles):
        raise ValueError("claim 'roles' must be a list of strings")
    obo = claims.get("obo")
    obo = obo if isinstance(obo, str) and obo else None
    key = (name, tenant, tuple(roles), obo)
    who = _PRINCIPALS.get(key)
    if who is None:  # the senders of a process's commands are few: one Principal each, hashed once
        if len(_PRINCIPALS) >= _PRINCIPALS_KEPT:  # anyone may sign with new names: the cache stays small
            _PRINCIPALS.clear()
        who = _PRINCIPALS[key] = Principal(name, tenant, frozenset(roles), obo)
    return who


#: Principals by (sub, tenant, roles as listed, obo) (see :func:`_principal`), at most _PRINCIPALS_KEPT.
_PRINCIPALS: dict[tuple[str, str, tuple[str, ...], str | None], Principal] = {}
_PRINCIPALS_KEPT = 1024


def _unauthenticated(reason: str) -> AuthError:
    return AuthError("Unauthenticated", reason)


def replayed(jti: str) -> AuthError:
    """The refusal of a command token whose id was used before."""
    return _unauthenticated(f"expected a new token id, but {jti!r} was already used (replayed command)")


# --------------------------------------------------------------------------- replay


class ReplayCache:
    """Token ids seen and not yet expired: a second use of a ``jti`` within its lifetime is a replay.

    Bounded by ``capacity``. Expired ids are dropped first; when the cache is still full, the id
    that expires soonest is forgotten early, and from then on every token expiring no later than
    it is refused (it might be a replay of a forgotten one): the cache fails closed, never open.

    Ids added since the last :meth:`commit` are *pending*: a caller that records them in a
    transaction calls :meth:`commit` once it committed, or :meth:`rollback` when it aborted (the
    commands are read again, and their ids must not count as seen). Pure: time is the ``now``
    argument.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"expected a positive capacity, but got {capacity}")
        self.capacity = capacity
        self._exp: dict[str, float] = {}
        # heap of (exp, jti); an entry whose jti is gone from _exp, or has another exp there, is stale
        self._due: list[tuple[float, str]] = []
        self._horizon = -math.inf  # the latest expiry forgotten before it was due
        self._pending: list[tuple[str, float]] = []

    def __len__(self) -> int:
        return len(self._exp)

    def __contains__(self, jti: object) -> bool:
        return jti in self._exp

    def add(self, jti: str, exp: float, now: float) -> None:
        """Remember ``jti`` until ``exp`` (pending until :meth:`commit`).

        Raises:
            AuthError: ``Unauthenticated``: ``jti`` was seen, or it expires no later than an id
                the full cache had to forget.
        """
        self.check(jti, exp, now)
        self._put(jti, exp)
        self._pending.append((jti, exp))

    def check(self, jti: str, exp: float, now: float) -> None:
        """Refuse ``jti`` as :meth:`add` would, without remembering it.

        Raises:
            AuthError: ``Unauthenticated``: ``jti`` was seen, or it expires no later than an id
                the full cache had to forget.
        """
        self._drop_expired(now)
        if jti in self._exp:
            raise replayed(jti)
        if exp <= self._horizon:
            raise _unauthenticated(f"expected a token expiring after {self._horizon}, as the replay cache is full and "
                                   f"forgot ids expiring until then, but it expires at {exp}")

    def load(self, seen: Iterable[tuple[str, float]], now: float) -> None:
        """Remember ids recorded earlier (e.g. before a restart); expired ones are skipped, none is pending."""
        self._drop_expired(now)
        for jti, exp in seen:
            if exp > now and jti not in self._exp:
                self._put(jti, exp)

    def pending(self) -> list[tuple[str, float]]:
        """``(jti, exp)`` of the ids added since the last :meth:`commit` or :meth:`rollback`, in order."""
        return list(self._pending)

    def commit(self) -> None:
        """The pending ids are recorded for good."""
        self._pending.clear()

    def rollback(self) -> None:
        """Forget the pending ids: the commands that brought them were not recorded."""
        for jti, exp in self._pending:
            if self._exp.get(jti) == exp:
                del self._exp[jti]
        self._pending.clear()

    def _put(self, jti: str, exp: float) -> None:
        if len(self._exp) >= self.capacity:
            self._forget_soonest()
        self._exp[jti] = exp
        heapq.heappush(self._due, (exp, jti))

    def _forget_soonest(self) -> None:
        while self._due:
            exp, jti = heapq.heappop(self._due)
            if self._exp.get(jti) == exp:
                del self._exp[jti]
                self._horizon = max(self._horizon, exp)
                return

    def _drop_expired(self, now: float) -> None:
        due = self._due
        while due and due[0][0] <= now:
            exp, jti = heapq.heappop(due)
            if self._exp.get(jti) == exp:
                del self._exp[jti]


# --------------------------------------------------------------------------- attempt tokens


def attempt_token(secret: bytes, instance_id: str, activity_id: str, attempt: int) -> str:
    """The capability token of one activity attempt: base64url(HMAC-SHA256(secret, attempt))."""
    return _attempt_mac(secret, instance_id, activity_id, attempt).decode("ascii")


def check_attempt_token(secret: bytes, instance_id: str, activity_id: str, attempt: int,
                        token: str | bytes | None) -> bool:
    """Whether ``token`` is the capability token of this attempt (a constant-time comparison)."""
    if not token:
        return False
    given = token.encode("utf-8", "replace") if isinstance(token, str) else bytes(token)
    return hmac.compare_digest(given, _attempt_mac(secret, instance_id, activity_id, attempt))


def progress_token(attempt_token: str | bytes) -> str:
    """What a worker's start and heartbeat reports carry instead of the attempt token:
    base64url(HMAC-SHA256(attempt token, domain)). It proves the attempt token without showing it,
    so a reader of the ``commands`` topic who sees an attempt's heartbeats cannot complete or fail
    that attempt (only its result carries the attempt token itself, and it closes the attempt)."""
    return _progress_mac(attempt_token.encode("ascii") if isinstance(attempt_token, str) else bytes(attempt_token)
                         ).decode("ascii")


def check_progress_token(secret: bytes, instance_id: str, activity_id: str, attempt: int,
                         token: str | bytes | None) -> bool:
    """Whether ``token`` vouches for a start or heartbeat report of this attempt: its progress token,
    or the attempt token itself (what workers of earlier releases send). Constant-time comparisons."""
    if not token:
        return False
    given = token.encode("utf-8", "replace") if isinstance(token, str) else bytes(token)
    mac = _attempt_mac(secret, instance_id, activity_id, attempt)
    return hmac.compare_digest(given, _progress_mac(mac)) | hmac.compare_digest(given, mac)


def _progress_mac(attempt_token: bytes) -> bytes:
    """:func:`progress_token`, as ASCII bytes."""
    return _b64_bytes(hmac_sha256(attempt_token, _PROGRESS_DOMAIN))


def _attempt_mac(secret: bytes, instance_id: str, activity_id: str, attempt: int) -> bytes:
    """:func:`attempt_token`, as ASCII bytes (the engine mints one per task and checks one per report)."""
    # the message: length-prefixed fields behind a domain tag, so no two attempts (or uses) share one
    iid, aid, n = instance_id.encode("utf-8"), activity_id.encode("utf-8"), str(attempt).encode("ascii")
    message = b"".join((_ATTEMPT_PREFIX, len(iid).to_bytes(4, "big"), iid, len(aid).to_bytes(4, "big"), aid,
                        len(n).to_bytes(4, "big"), n))
    return _b64_bytes(hmac_sha256(secret, message))


#: The domain tag of attempt messages with its length prefix.
_ATTEMPT_PREFIX = len(_ATTEMPT_DOMAIN).to_bytes(4, "big") + _ATTEMPT_DOMAIN
#: HMAC-SHA256 keys -> their hashed inner and outer pads (:func:`hmac_sha256`); a handful of keys
#: per process, bounded all the same.
_HMAC_PADS: dict[bytes, tuple[Any, Any]] = {}
_HMAC_PADS_MAX = 64
_SHA256_BLOCK = 64


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` under ``key`` (RFC 2104; the bytes ``hmac.digest(key, message,
    "sha256")`` returns), from the key's pads hashed once per key. The engine computes one per
    command token and two per activity attempt; ``hmac.digest`` sets up OpenSSL's HMAC afresh on
    every call and releases the GIL around it, which costs several times the hashing itself in a
    process whose other threads then take the GIL."""
    if type(key) is not bytes:
        key = bytes(key)
    pads = _HMAC_PADS.get(key)
    if pads is None:
        block = (hashlib.sha256(key).digest() if len(key) > _SHA256_BLOCK else key).ljust(_SHA256_BLOCK, b"\0")
        pads = (hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(bytes(b ^ 0x5C for b in block)))
        if len(_HMAC_PADS) >= _HMAC_PADS_MAX:
            _HMAC_PADS.clear()
        _HMAC_PADS[key] = pads
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return outer.digest()


def _b64(raw: bytes) -> str:
    return _b64_bytes(raw).decode("ascii")


_URLSAFE = bytes.maketrans(b"+/", b"-_")


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64url_decode(text: str) -> bytes:
    """The bytes of unpadded base64url ``text`` (what ``base64.urlsafe_b64decode`` makes of it padded:
    the same lenient decoding, without its layers of argument handling).

    Raises:
        binascii.Error: not base64.
        UnicodeEncodeError: not ASCII (a ValueError).
    """
    raw = text.encode("ascii")
    return binascii.a2b_base64(raw.translate(_FROM_URLSAFE) + b"=" * (-len(raw) % 4))


def _b64_bytes(raw: bytes) -> bytes:
    """base64url of ``raw``, unpadded (what ``base64.urlsafe_b64encode(raw).rstrip(b"=")`` makes)."""
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=")
