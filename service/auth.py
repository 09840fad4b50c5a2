"""Tokens -> Principal. One dependency serves REST and websockets.

A token is a JWT with ``sub`` (the user id, which becomes the author of every message) and
``exp`` (required), optionally ``name``. It is read from, in this order, ``Authorization:
Bearer``, the ``session`` cookie, or the ``token`` query parameter (browsers cannot set headers
on a websocket). Only the configured algorithms are accepted, so ``alg: none`` and algorithm
confusion (an HS256 token signed with a public key) are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from service.config import Settings
from service.errors import NotAuthenticated

MAX_TOKEN_BYTES = 4096
MAX_SUBJECT_CHARS = 128
DEV_TOKEN_TTL = 24 * 3600
LEEWAY = 30
"""Seconds of clock skew tolerated on ``exp``."""
VERIFIED_CACHE_SIZE = 4096
"""Tokens remembered as verified, until they expire: a client sends the same token with every
request, and checking its signature and claims again cost ~12% of a REST history page."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a token came from: a cookie token is subject to the Origin check (CSWSH)."""

    token: str
    origin: str  # "header" | "cookie" | "query"


class TokenCodec:
    """Verifies (and, with a shared secret, issues) the service's tokens."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._verified: dict[str, tuple[Principal, float]] = {}
        """token -> (its principal, the time it stops being accepted); oldest first."""
        if settings.jwt_public_key:
            self._verify_key: str = settings.jwt_public_key
            self._algorithms = ["RS256", "ES256"]
        elif settings.jwt_secret is not None:
            self._verify_key = settings.jwt_secret.get_secret_value()
            self._algorithms = ["HS256"]
        else:
            raise RuntimeError("no JWT secret or public key configured")
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None

    @property
    def can_issue(self) -> bool:
        return self._secret is not None

    def issue(self, user_id: str, *, ttl: int, name: str | None = None) -> str:
        if self._secret is None:
            raise RuntimeError("issuing tokens needs CHAT_JWT_SECRET")
        now = int(time.time())
        claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl}
        if name:
            claims["name"] = name
        return jwt.encode(claims, self._secret, algorithm="HS256")

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
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=self._algorithms,
                options={"require": ["exp", "sub"]},
                leeway=LEEWAY,
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("token expired") from None
        except jwt.InvalidTokenError:
            raise NotAuthenticated("invalid token") from None
        sub = claims.get("sub")
        if (
            not isinstance(sub, str)
            or not 0 < len(sub) <= MAX_SUBJECT_CHARS
            or not sub.isprintable()
        ):
            raise NotAuthenticated("invalid token subject")
        name = claims.get("name")
        principal = Principal(user_id=sub, name=name if isinstance(name, str) else None)
        return principal, float(claims["exp"]) + LEEWAY


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
