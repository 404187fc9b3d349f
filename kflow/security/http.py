"""Who is calling the HTTP API and console: bearer tokens, API keys, console logins and their sessions.

:class:`HttpAuth` turns a request's credentials into a :class:`~kflow.security.Principal`, in
this order: a session cookie (:data:`SESSION_COOKIE`, set by a console login), an
``Authorization: Bearer`` principal token (HS256 with ``KFLOW_JWT_SECRET``, or RS256/ES256
against ``KFLOW_JWKS_FILE``, with ``aud``/``iss`` checked when configured), an ``X-API-Key``.
Credentials that do not verify are refused with the reason; they never fall through to the
next kind. The pieces it is made of:

* :class:`UserFile` — console users (``KFLOW_USERS_FILE``), argon2 password hashes;
* :class:`ApiKeyFile` — API keys (``KFLOW_API_KEYS_FILE``), stored as SHA-256 hashes only
  (a key is 32 random bytes, so a fast hash is as safe as a slow one and costs nothing per call);
* :class:`LoginLimiter` — failed logins counted per user and per client IP in a sliding window;
* :class:`Sessions` — the session cookie (a JWT signed with a key derived from
  ``KFLOW_JWT_SECRET``, so it never verifies as a principal token, nor one as a session) and its
  CSRF token (an HMAC of the session's id), which every cookie-authenticated POST must echo in
  the :data:`CSRF_HEADER` header.

Time is an argument (epoch seconds) everywhere; nothing here reads the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jwt
import yaml

try:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("console logins need the visibility extra: pip install 'kflow[visibility]'",
                              name=exc.name) from exc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kflow.model.errors import KflowError
from kflow.security.principal import DEFAULT_TENANT, AuthError, Principal
from kflow.security.tokens import Keys, verify_token

__all__ = [
    "API_KEY_HEADER",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "ApiKeyFile",
    "AuthFileError",
    "HttpAuth",
    "LoginLimiter",
    "RateLimited",
    "Sessions",
    "UserFile",
    "hash_password",
    "mint_api_key",
]

#: The console's session cookie.
SESSION_COOKIE = "kflow_session"
#: The header a cookie-authenticated POST carries its CSRF token in.
CSRF_HEADER = "X-CSRF-Token"
#: The header an API key is presented in.
API_KEY_HEADER = "X-API-Key"
#: The window failed logins are counted in.
LOGIN_WINDOW_S = 900.0
#: Most users and client IPs whose failed logins are remembered (the oldest are forgotten first).
LOGIN_TRACKED = 10_000
_API_KEY_PREFIX = "kflow_"
_SESSION_TYP = "kflow.session"
_HASHER = PasswordHasher()
# verified against when a login names an unknown user, so the answer takes as long as for a known one
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


class AuthFileError(KflowError):
    """A users or API keys file is unusable; ``problems`` lists every problem at once."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"invalid {source}: " + "; ".join(problems))


class RateLimited(KflowError):
    """Too many failed logins for a user or a client IP; retry after ``retry_after_s``."""

    def __init__(self, who: str, retry_after_s: int) -> None:
        self.who, self.retry_after_s = who, retry_after_s
        super().__init__(f"too many failed logins for {who}: try again in {retry_after_s}s")


# --------------------------------------------------------------------------- files


class _User(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    username: str = Field(min_length=1, max_length=255)
    password_hash: str = Field(pattern=r"^\$argon2(id|i|d)\$")
    tenant: str = Field(DEFAULT_TENANT, min_length=1)
    roles: tuple[str, ...] = ()


class _Users(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    users: tuple[_User, ...] = ()


class _ApiKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9]{8,64}$")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    principal: str = Field(min_length=1)
    tenant: str = Field(DEFAULT_TENANT, min_length=1)
    roles: tuple[str, ...] = ()


class _ApiKeys(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_keys: tuple[_ApiKey, ...] = ()


def _load_yaml(path: str | Path, model: type[BaseModel], what: str) -> Any:
    source = f"{what} {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuthFileError(source, [f"cannot read it: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise AuthFileError(source, [f"not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()]
        raise AuthFileError(source, problems) from None


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` for a users file (the library's recommended parameters)."""
    if not password:
        raise ValueError("expected a non-empty password")
    return _HASHER.hash(password)


class UserFile:
    """Console users: name → (argon2 hash, tenant, roles), from a YAML users file.

    Raises:
        AuthFileError: the file is unreadable, not YAML, or does not validate (every problem
            listed, including a name used twice).
    """

    def __init__(self, path: str | Path) -> None:
        doc = _load_yaml(path, _Users, "users file")
        names = [u.username for u in doc.users]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise AuthFileError(f"users file {path}", [f"username {n!r} is listed more than once" for n in twice])
        self._users: dict[str, _User] = {u.username: u for u in doc.users}

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, username: str, password: str) -> Optional[Principal]:
        """The user's principal when ``password`` is theirs, else None (as slow for an unknown name)."""
        user = self._users.get(username)
        try:
            _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if user is None:
            return None
        return Principal(user.username, user.tenant, frozenset(user.roles))


def mint_api_key(principal: str, tenant: str = DEFAULT_TENANT, roles: Iterable[str] = ()) -> tuple[str, dict[str, Any]]:
    """A new API key and the entry of an API keys file that accepts it (holding its hash only).

    Returns:
        ``(key, entry)``: the key to hand to its user (shown once), and the file entry.
    """
    if not principal or not tenant:
        raise ValueError("an API key needs a principal and a tenant")
    key_id = secrets.token_hex(8)
    key = f"{_API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key, {"id": key_id, "hash": _key_hash(key), "principal": principal, "tenant": tenant,
                 "roles": sorted(set(roles))}


def _key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyFile:
    """API keys by id, each with the SHA-256 hash of the key and whom it authenticates.

    Raises:
        AuthFileError: as :class:`UserFile` (an id used twice included).
    """

    def __init__(self, path: str | Path) -> None:
        doc = _load_yaml(path, _ApiKeys, "API keys file")
        ids = [k.id for k in doc.api_keys]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise AuthFileError(f"API keys file {path}", [f"key id {i!r} is listed more than once" for i in twice])
        self._keys: dict[str, _ApiKey] = {k.id: k for k in doc.api_keys}

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, key: str) -> Principal:
        """The principal of ``key``.

        Raises:
            AuthError: ``Unauthenticated``: malformed, unknown or wrong key.
        """
        parts = key.split("_", 2) if key.startswith(_API_KEY_PREFIX) else []
        if len(parts) != 3 or len(key) > 256:
            raise AuthError("Unauthenticated", f"expected an API key like {_API_KEY_PREFIX}<id>_<secret>, but "
                                               f"the {API_KEY_HEADER} header holds something else")
        entry = self._keys.get(parts[1])
        # compared in constant time; an unknown id is compared against a hash too
        given = _key_hash(key).encode("ascii")
        stored = entry.hash.encode("ascii") if entry else _key_hash("").encode("ascii")
        if not hmac.compare_digest(given, stored) or entry is None:
            raise AuthError("Unauthenticated", "expected a valid API key, but this one is unknown or revoked")
        return Principal(entry.principal, entry.tenant, frozenset(entry.roles))


# --------------------------------------------------------------------------- login rate limit


class LoginLimiter:
    """Failed logins per user and per client IP in a sliding window; over the limit, logins wait.

    A user may fail ``per_user`` times and an IP ``per_ip`` times within ``window_s``; the next
    attempt is refused (without checking the password) until the oldest failure leaves the
    window. Bounded: at most :data:`LOGIN_TRACKED` users and IPs are remembered, the least
    recently failed forgotten first. A success clears the user's failures (not the IP's).
    """

    def __init__(self, per_user: int, per_ip: int, window_s: float = LOGIN_WINDOW_S,
                 tracked: int = LOGIN_TRACKED) -> None:
        self.per_user, self.per_ip, self.window_s, self.tracked = per_user, per_ip, window_s, tracked
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()

    def check(self, username: str, ip: str, now: float) -> None:
        """Raises :class:`RateLimited` when ``username`` or ``ip`` has no attempts left."""
        for key, limit, who in ((f"u:{username}", self.per_user, f"user {username!r}"),
                                (f"ip:{ip}", self.per_ip, f"client {ip}")):
            times = self._recent(key, now)
            if len(times) >= limit:
                raise RateLimited(who, max(1, math.ceil(times[0] + self.window_s - now)))

    def failed(self, username: str, ip: str, now: float) -> None:
        for key in (f"u:{username}", f"ip:{ip}"):
            times = self._recent(key, now)
            times.append(now)
            self._fails[key] = times
            self._fails.move_to_end(key)
        while len(self._fails) > self.tracked:
            self._fails.popitem(last=False)

    def succeeded(self, username: str) -> None:
        self._fails.pop(f"u:{username}", None)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._fails.get(key) or deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times


# --------------------------------------------------------------------------- sessions


class Sessions:
    """Console sessions as signed cookies, and the CSRF token of each.

    Args:
        secret: ``KFLOW_JWT_SECRET``; the session key is derived from it (so sessions outlive a
            restart and work on every replica). None: a random key, valid in this process only.
        ttl_s: How long a session lasts.
    """

    def __init__(self, secret: Optional[bytes], ttl_s: float) -> None:
        base = secret if secret is not None else secrets.token_bytes(32)
        self._key = hmac.new(base, b"kflow.session.v1", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def issue(self, who: Principal, now: float) -> tuple[str, str]:
        """``(cookie value, CSRF token)`` of a new session of ``who``."""
        jti = secrets.token_urlsafe(16)
        claims = {"typ": _SESSION_TYP, "sub": who.name, "tenant": who.tenant, "roles": sorted(who.roles),
                  "iat": int(now), "exp": int(now + self.ttl_s), "jti": jti}
        return jwt.encode(claims, self._key, algorithm="HS256"), self.csrf(jti)

    def csrf(self, jti: str) -> str:
        mac = hmac.new(self._key, b"csrf\x00" + jti.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def verify(self, cookie: str, now: float) -> tuple[Principal, str]:
        """``(principal, CSRF token)`` of a session cookie.

        Raises:
            AuthError: ``Unauthenticated``: forged, malformed or expired.
        """
        if len(cookie) > 4096:
            raise AuthError("Unauthenticated", "expected a session cookie, but it is far too long")
        try:
            claims = jwt.decode(cookie, self._key, algorithms=["HS256"],
                                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
        except jwt.PyJWTError:
            raise AuthError("Unauthenticated", "expected a session this server signed, but the cookie is not "
                                               "one (log in again)") from None
        if claims.get("typ") != _SESSION_TYP or not isinstance(claims.get("jti"), str):
            raise AuthError("Unauthenticated", "expected a session cookie, but it holds another kind of token")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or now >= exp:
            raise AuthError("Unauthenticated", "the session has expired: log in again")
        roles = claims.get("roles") or []
        who = Principal(str(claims.get("sub") or ""), str(claims.get("tenant") or DEFAULT_TENANT),
                        frozenset(r for r in roles if isinstance(r, str)))
        return who, self.csrf(claims["jti"])


# --------------------------------------------------------------------------- the authenticator


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the principal and how it proved itself.

    Attributes:
        principal: Who.
        method: ``session``, ``bearer``, ``api_key``, or ``anonymous`` (auth off).
        csrf: The session's CSRF token (``session`` only).
    """

    principal: Principal
    method: str
    csrf: Optional[str] = None


#: The caller of every request when auth is off.
ANONYMOUS = Caller(Principal("anonymous", DEFAULT_TENANT, frozenset()), "anonymous")


class HttpAuth:
    """The credentials an API server accepts, from its settings.

    Args:
        keys: Keys that verify bearer tokens (and sign the commands of HTTP callers).
        users: Console users, or None (no password login).
        api_keys: API keys, or None.
        sessions: The session cookie codec.
        limiter: The login rate limiter.
        audience: The ``aud`` bearer tokens must name (None: refuse tokens with one).
        issuer: The ``iss`` bearer tokens must name (None: not checked).
    """

    def __init__(self, keys: Keys, *, users: Optional[UserFile], api_keys: Optional[ApiKeyFile], sessions: Sessions,
                 limiter: LoginLimiter, audience: Optional[str] = None, issuer: Optional[str] = None) -> None:
        self.keys, self.users, self.api_keys, self.sessions, self.limiter = keys, users, api_keys, sessions, limiter
        self.audience, self.issuer = audience, issuer

    @classmethod
    def from_config(cls, config: Any) -> HttpAuth:
        """From a :class:`~kflow.config.VisibilityConfig` (its auth settings).

        Raises:
            KeyConfigError: keys set but unusable. AuthFileError: a users or API keys file is.
        """
        keys = config.keys()
        return cls(keys, users=UserFile(config.users_file) if config.users_file else None,
                   api_keys=ApiKeyFile(config.api_keys_file) if config.api_keys_file else None,
                   sessions=Sessions(keys.secret, config.session_ttl_ms / 1000),
                   limiter=LoginLimiter(config.login_max_failures, 4 * config.login_max_failures),
                   audience=config.jwt_audience or None, issuer=config.jwt_issuer or None)

    def authenticate(self, headers: Mapping[str, str], cookies: Mapping[str, str], now: float) -> Caller:
        """The caller a request's credentials prove.

        Raises:
            AuthError: ``Unauthenticated``: none given, or the one given does not verify.
        """
        cookie = cookies.get(SESSION_COOKIE)
        if cookie:
            who, csrf = self.sessions.verify(cookie, now)
            return Caller(who, "session", csrf)
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("Unauthenticated", "expected 'Authorization: Bearer <token>', but got another scheme")
            who = verify_token(token.strip(), self.keys, now, audience=self.audience, issuer=self.issuer)
            return Caller(who, "bearer")
        key = headers.get(API_KEY_HEADER.lower())
        if key:
            if self.api_keys is None:
                raise AuthError("Unauthenticated", "expected no API key: this server has none configured "
                                                   "(KFLOW_API_KEYS_FILE)")
            return Caller(self.api_keys.verify(key.strip()), "api_key")
        raise AuthError("Unauthenticated", "expected credentials (a bearer token, an API key or a console login), "
                                           "but the request has none")

    def login(self, username: str, password: str, ip: str, now: float) -> Principal:
        """Check a console login.

        Raises:
            RateLimited: too many failures for the user or the IP (the password is not checked).
            AuthError: ``Unauthenticated``: wrong name or password, or no users configured.
        """
        if self.users is None:
            raise AuthError("Unauthenticated", "console login is not configured on this server: set KFLOW_USERS_FILE")
        self.limiter.check(username, ip, now)
        who = self.users.verify(username, password)
        if who is None:
            self.limiter.failed(username, ip, now)
            raise AuthError("Unauthenticated", "invalid username or password")
        self.limiter.succeeded(username)
        return who
