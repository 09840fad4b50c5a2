"""Tokens -> Principal. One dependency (``CurrentUser``) serves REST and websockets.

A token is a JWT with ``exp`` and a user id, which becomes the author of every message. It is
read from, in this order, ``Authorization: Bearer``, the ``session`` cookie, or the ``token``
query parameter (browsers cannot set headers on a websocket).

Two kinds of token are accepted side by side:

* the service's own, HS256 with ``CHAT_JWT_SECRET`` (``chat-service token``, dev logins, or
  the app's backend): user id in ``sub``, display name in ``name``;
* an identity provider's, verified with ``CHAT_JWKS_URL``'s keys (chosen by ``kid``) or
  ``CHAT_JWT_PUBLIC_KEY``: user id and display name in the configured claims, ``aud`` and
  ``iss`` checked when configured.

Every key verifies only the algorithms fixed by the key (``service.idp``): HS256 goes to the
secret and nowhere else, so ``alg: none``, algorithm confusion (HS256 signed with a public
key), a key of the wrong type or curve, and an unknown ``kid`` are all refused. Whatever is
wrong with a token, the answer is ``NotAuthenticated`` (401, websocket refused), never a crash.

The dependencies both transports declare (``CurrentUser``, ``RoomName``) live here, below
``service.api`` and ``service.realtime``, so neither transport imports the other; the room a
caller names is checked here because who may use which room is this module's question.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

import jwt
from fastapi import Depends, Path, WebSocketException
from starlette.requests import HTTPConnection

from service.config import ROOM_NAME_MAX, ROOM_NAME_PATTERN, Settings
from service.errors import NotAuthenticated
from service.idp import (
    ASYMMETRIC_ALGORITHMS,
    MAX_KID_CHARS,
    JwksCache,
    RateLimitedLog,
    VerificationKey,
    load_public_key,
)

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096
MAX_SUBJECT_CHARS = 128
MAX_NAME_CHARS = 128
DEV_TOKEN_TTL = 24 * 3600
LEEWAY = 30
"""Seconds of clock skew tolerated on ``exp`` when a token is presented. A live websocket is
still closed at ``exp`` itself, and an ``auth`` frame's token must not have reached it."""
VERIFIED_CACHE_SIZE = 4096
"""Tokens remembered as verified, until they expire: a client sends the same token with every
request, and checking its signature and claims again cost ~12% of a REST history page."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    name: str | None = None
    expires_at: float | None = field(default=None, compare=False)
    """The token's ``exp`` (Unix seconds), when a websocket on it is closed (4401) unless an
    ``auth`` frame renews it. Every token ``TokenCodec`` accepts has one (``exp`` is required);
    None is for a principal made otherwise, and never expires a socket."""
    admin: bool = False
    """A service admin: the token's ``CHAT_ADMIN_CLAIM`` names ``CHAT_ADMIN_ROLE``. May read
    and manage every room (``service.chat.rooms``): how an app's backend acts for its users."""


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a token came from: a cookie token is subject to the Origin check (CSWSH)."""

    token: str
    origin: str  # "header" | "cookie" | "query"


class UnknownKey(NotAuthenticated):
    """The token names a key the cached JWKS does not have (yet): worth one refetch."""


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    """Where the user id and name are, and which ``aud`` / ``iss`` are required."""

    user_claim: str = "sub"
    name_claim: str | None = "name"
    audience: tuple[str, ...] | None = None
    issuer: str | None = None


OWN_TOKENS = ClaimPolicy()


class TokenCodec:
    """Verifies tokens (the service's own and an identity provider's) and issues its own.

    ``verify`` never touches the network: a token whose ``kid`` is not cached is refused with
    ``UnknownKey``. ``authenticate`` is what requests call: it refetches the JWKS once (rate
    limited, shared) for an unknown ``kid`` before refusing.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._verified: dict[str, tuple[Principal, float]] = {}
        """token -> (its principal, the time it stops being accepted); oldest first."""
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._public_key = (
            load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
        )
        self.jwks = (
            JwksCache(
                settings.jwks_url,
                min_interval=settings.jwks_min_refetch_seconds,
                max_age=settings.jwks_max_age_seconds,
                timeout=settings.jwks_timeout,
            )
            if settings.jwks_url
            else None
        )
        if self._secret is None and self._public_key is None and self.jwks is None:
            raise RuntimeError("no JWT secret, public key or JWKS URL configured")
        audience = tuple(a.strip() for a in (settings.jwt_audience or "").split(",") if a.strip())
        self._idp = ClaimPolicy(
            user_claim=settings.jwt_user_claim,
            name_claim=settings.jwt_name_claim or None,
            audience=audience or None,
            issuer=settings.jwt_issuer or None,
        )
        self._admin_claim = settings.admin_claim
        self._admin_role = settings.admin_role
        self._warn = RateLimitedLog(log)

    @property
    def can_issue(self) -> bool:
        return self._secret is not None

    def start(self) -> None:
        """In the lifespan: fetch the JWKS in the background (start-up does not wait for it)."""
        if self.jwks is not None:
            self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    def issue(self, user_id: str, *, ttl: int, name: str | None = None, admin: bool = False) -> str:
        """A token of the service's own; ``admin``: a service admin's."""
        if self._secret is None:
            raise RuntimeError("issuing tokens needs CHAT_JWT_SECRET")
        now = int(time.time())
        claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl}
        if name:
            claims["name"] = name
        if admin:
            claims[self._admin_claim] = [self._admin_role]
        return jwt.encode(claims, self._secret, algorithm="HS256")

    async def authenticate(self, token: str) -> Principal:
        """``verify``, with one JWKS refetch (at most one per interval, shared) for a token
        signed with a key the cache does not know yet: the provider has rotated its keys."""
        try:
            principal = self.verify(token)
        except UnknownKey:
            if self.jwks is None:
                raise
            await self.jwks.refresh()
            return self.verify(token)
        if self.jwks is not None:
            self.jwks.refresh_if_stale()
        return principal

    def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            principal, expires = known
            if self._clock() < expires:
                return principal
            del self._verified[token]
            raise NotAuthenticated("token expired")
        principal, expires = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = principal, expires
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        if len(token) > MAX_TOKEN_BYTES:
            raise NotAuthenticated("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise NotAuthenticated("invalid token") from None
        key, policy = self._key_for(header.get("alg"), header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=key.algorithms,
                audience=policy.audience,
                issuer=policy.issuer,
                options={
                    "require": ["exp", policy.user_claim],
                    "verify_aud": policy.audience is not None,
                    "verify_sub": policy.user_claim == "sub",
                },
                leeway=LEEWAY,
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("token expired") from None
        except (
            jwt.InvalidAudienceError,
            jwt.InvalidIssuerError,
            jwt.MissingRequiredClaimError,
        ) as exc:  # what an operator wiring in a provider needs to read; nothing secret
            raise NotAuthenticated(f"invalid token: {exc}") from None
        except jwt.PyJWTError:
            raise NotAuthenticated("invalid token") from None
        except Exception as exc:
            # A token no check above foresaw must still be a 401, not a 500 with a traceback:
            # one line says what happened, for whoever maintains this code.
            self._warn.warning(
                "unexpected", "token refused on an unexpected error: %s", type(exc).__name__
            )
            raise NotAuthenticated("invalid token") from None
        return self._principal(claims, policy)

    def _key_for(self, alg: object, kid: object) -> tuple[VerificationKey, ClaimPolicy]:
        """The one key (and claim policy) the token may be verified with. The header only
        says which key is meant; what that key accepts is fixed by the key."""
        if alg == "HS256":
            if self._secret is None:
                raise NotAuthenticated("invalid token: HS256 is not accepted here")
            return VerificationKey(self._secret, ("HS256",)), OWN_TOKENS
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise NotAuthenticated("invalid token: unsupported algorithm")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise NotAuthenticated("invalid token: bad kid")
        if self.jwks is not None:
            key = self.jwks.get(kid)
            if key is not None:
                return key, self._idp
        if self._public_key is not None and alg in self._public_key.algorithms:
            return self._public_key, self._idp
        if self.jwks is not None:
            raise UnknownKey("invalid token: unknown signing key")
        raise NotAuthenticated("invalid token: no key for this algorithm")

    def _is_admin(self, claims: dict[str, object]) -> bool:
        """The admin claim holds the admin role: in a list of strings, or a space-separated
        string (as OAuth's ``scope``)."""
        roles = claims.get(self._admin_claim)
        if isinstance(roles, str):
            return self._admin_role in roles.split()
        if isinstance(roles, list):
            return self._admin_role in roles
        return False

    def _principal(self, claims: dict[str, object], policy: ClaimPolicy) -> tuple[Principal, float]:
        user = claims.get(policy.user_claim)
        if (
            not isinstance(user, str)
            or not 0 < len(user) <= MAX_SUBJECT_CHARS
            or not user.isprintable()
        ):
            raise NotAuthenticated("invalid token subject")
        name = claims.get(policy.name_claim) if policy.name_claim else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            name = None
        exp = claims["exp"]
        if not isinstance(exp, int | float):  # PyJWT has checked it is a number
            raise NotAuthenticated("invalid token")
        principal = Principal(user_id=user, name=name, expires_at=exp, admin=self._is_admin(claims))
        return principal, float(exp) + LEEWAY


def extract_token(
    *, authorization: str | None, cookie: str | None, query: str | None
) -> TokenSource | None:
    """The first token present; a malformed Authorization header is an error, not a fallback."""
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise NotAuthenticated("Authorization header must be 'Bearer <token>'")
        return TokenSource(value.strip(), "header")
    if cookie:
        return TokenSource(cookie, "cookie")
    if query:
        return TokenSource(query, "query")
    return None


async def get_principal(conn: HTTPConnection) -> Principal:
    """The caller, from a header, cookie or ``token`` query parameter; refused before accept.

    Async on purpose: a sync dependency would run in a thread. ``conn.state.services`` is the
    lifespan's ``service.services.Services`` (read untyped: that module imports this one)."""
    services = conn.state.services
    try:
        source = extract_token(
            authorization=conn.headers.get("authorization"),
            cookie=conn.cookies.get("session"),
            query=conn.query_params.get("token"),
        )
        if source is None:
            raise NotAuthenticated("missing token")
        if source.origin == "cookie":
            check_origin(conn, services.settings.origins)
        tokens: TokenCodec = services.tokens
        return await tokens.authenticate(source.token)
    except NotAuthenticated as exc:
        if conn.scope["type"] == "websocket":
            raise WebSocketException(NotAuthenticated.close_code, exc.detail) from None
        raise  # answered by the app's ChatError handler: 401 with WWW-Authenticate


def check_origin(conn: HTTPConnection, allowed: frozenset[str]) -> None:
    """A cookie is sent by the browser whatever page asks: only trusted pages may use it.

    Browsers always send ``Origin`` on websockets and cross-site requests; a request without
    one does not come from another site's page.
    """
    origin = conn.headers.get("origin")
    if origin is None:
        return
    origin = origin.rstrip("/")
    same_site = urlsplit(origin).netloc == conn.headers.get("host")
    if not same_site and origin not in allowed:
        raise NotAuthenticated(f"origin {origin!r} may not use the session cookie")


CurrentUser = Annotated[Principal, Depends(get_principal)]

RoomName = Annotated[
    str,
    Path(
        pattern=ROOM_NAME_PATTERN,
        max_length=ROOM_NAME_MAX,
        description="1 to 64 of A-Z a-z 0-9 _ . -, not only dots",
    ),
]
