"""An identity provider's signing keys: a PEM public key, or a JWKS fetched and cached.

Each key carries the algorithms it verifies, fixed by the key itself (an RSA key: RS*/PS*, or
the JWK's ``alg``; an EC key: the one ES* of its curve; an Ed25519/Ed448 key: EdDSA), so a
token's header can never choose a weaker verification. Symmetric (``oct``) JWKs, encryption
keys, RSA keys under 2048 bits and unknown curves are skipped.

The JWKS cache guarantees:

* Verifying a token waits on the network only for a ``kid`` the cache does not know, and then
  for at most the fetch's deadline; concurrent requests share one fetch.
* The endpoint is fetched at most once every ``min_interval`` seconds whatever tokens arrive:
  a flood of made-up kids costs one request per interval.
* A failed fetch (endpoint down, slow, too big, not a JWKS) changes nothing: cached keys keep
  working. A successful one replaces the set, so a key the provider removed stops verifying.
* Keys older than ``max_age`` are refetched in the background when next used.
* Fetches run in a thread (stdlib urllib) with a total deadline and a size cap, never on the
  event loop. Failures are one WARNING line without traceback, at most one a minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.client import HTTPMessage
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm

log = logging.getLogger(__name__)

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EC_ALGORITHM_BY_JWK_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
ASYMMETRIC_ALGORITHMS = frozenset((*RSA_ALGORITHMS, *EC_ALGORITHM_BY_CURVE.values(), "EdDSA"))
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100
MAX_KID_CHARS = 256
LOG_EVERY = 60.0
"""Seconds between two WARNING lines about the same kind of failure."""
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A key and the only algorithms it may verify."""

    key: Any
    algorithms: tuple[str, ...]
    kid: str | None = None


def algorithms_for(key: object, declared: object = None) -> tuple[str, ...]:
    """The algorithms a public key verifies; ``declared`` (a JWK's ``alg``) narrows them."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} needed)")
        allowed: tuple[str, ...] = RSA_ALGORITHMS
    elif isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        allowed = (alg,)
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        allowed = ("EdDSA",)
    else:
        raise ValueError(f"unsupported key type {type(key).__name__}")
    if declared is None:
        return allowed
    if declared not in allowed:
        raise ValueError(f"alg {declared!r} does not fit this key (it verifies {allowed})")
    return (str(declared),)


def load_public_key(text: str) -> VerificationKey:
    """A PEM public key or certificate; also a bare base64 key (Keycloak's realm page shows one)
    and ``\\n`` escapes (a PEM squeezed into one environment variable line)."""
    text = text.strip().replace("\\n", "\n")
    if not text.startswith("-----BEGIN"):
        text = f"-----BEGIN PUBLIC KEY-----\n{text}\n-----END PUBLIC KEY-----"
    data = text.encode()
    try:
        if b"CERTIFICATE" in data.split(b"\n", 1)[0]:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"CHAT_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None
    try:
        return VerificationKey(key, algorithms_for(key))
    except ValueError as exc:
        raise ValueError(f"CHAT_JWT_PUBLIC_KEY: {exc}") from None


def key_from_jwk(jwk: object) -> VerificationKey:
    """One JWK -> a verification key; ValueError says why it cannot be one."""
    if not isinstance(jwk, dict):
        raise ValueError("not an object")
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
        raise ValueError("kid is not a short string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use {jwk.get('use')!r}")
    public = {k: v for k, v in jwk.items() if k not in _PRIVATE_MEMBERS}
    kty = jwk.get("kty")
    declared = jwk.get("alg")
    families: dict[str, type[Algorithm]] = {
        "RSA": RSAAlgorithm,
        "EC": ECAlgorithm,
        "OKP": OKPAlgorithm,
    }
    algorithm = families.get(str(kty))
    if algorithm is None:
        raise ValueError(f"unsupported kty {str(kty)[:20]!r}")
    try:
        key: Any = algorithm.from_jwk(public)
    except Exception as exc:  # PyJWT's InvalidKeyError, cryptography's ValueError...
        raise ValueError(f"invalid {kty} key: {exc}") from None
    if kty == "EC" and declared is None:  # the curve decides; from_jwk has checked it
        declared = EC_ALGORITHM_BY_JWK_CURVE.get(str(jwk.get("crv")))
    return VerificationKey(key, algorithms_for(key, declared), kid)


def parse_jwks(body: bytes) -> tuple[list[VerificationKey], list[str]]:
    """The usable keys of a JWKS document, and why the others were skipped."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS (no "keys" list)')
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for jwk in document["keys"][:MAX_KEYS]:
        if isinstance(jwk, dict) and jwk.get("use") == "enc":
            continue  # published for encryption (Keycloak does): not ours, not a problem
        try:
            keys.append(key_from_jwk(jwk))
        except ValueError as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            skipped.append(f"{str(kid)[:40]!r}: {exc}")
    if not keys:
        raise ValueError(f"no usable signing key ({'; '.join(skipped) or 'empty'})")
    return keys, skipped


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_jwks(url: str, timeout: float) -> tuple[list[VerificationKey], list[str]]:
    """GET and parse a JWKS. Blocking: call it in a thread. The whole exchange, not each read,
    is bounded by ``timeout``; bodies over ``MAX_JWKS_BYTES`` are refused."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by Settings
        url, headers={"Accept": "application/json", "User-Agent": "chat-service"}
    )
    with opener.open(request, timeout=timeout) as response:
        chunks: list[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout:g} s")
            chunk = response.read1(16384)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_JWKS_BYTES:
                raise ValueError(f"answer larger than {MAX_JWKS_BYTES} bytes")
            chunks.append(chunk)
    return parse_jwks(b"".join(chunks))


class RateLimitedLog:
    """WARNING lines that an attacker or a dead endpoint cannot turn into a flood."""

    def __init__(self, logger: logging.Logger, *, every: float = LOG_EVERY) -> None:
        self._log = logger
        self._every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += f" ({suppressed} more since the last such line)"
        self._log.warning(message, *args)


Fetch = Callable[[str, float], tuple[list[VerificationKey], list[str]]]


class JwksCache:
    """The provider's keys by ``kid``; see the module docstring for what it guarantees."""

    def __init__(
        self,
        url: str,
        *,
        min_interval: float,
        max_age: float,
        timeout: float,
        fetch: Fetch = fetch_jwks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        parts = urlsplit(url)
        self._shown_url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        """What the log says: the URL without any credentials in it."""
        self._min_interval = min_interval
        self._max_age = max_age
        self._timeout = timeout
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str | None, VerificationKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._failing = False
        self._warn = RateLimitedLog(log)

    def get(self, kid: str | None) -> VerificationKey | None:
        """The key for ``kid``; a token without one matches a JWKS of exactly one key."""
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def keys(self) -> Iterable[VerificationKey]:
        return self._keys.values()

    def start(self) -> None:
        """Fetch in the background now: a provider that is down does not delay start-up."""
        self._start_fetch()

    async def refresh(self) -> None:
        """Fetch unless one ran less than ``min_interval`` ago; join a fetch in flight."""
        task = self._inflight
        if task is None and self._may_fetch():
            task = self._start_fetch()
        if task is not None:
            # Shielded: a caller that goes away must not cancel the fetch the others wait for.
            await asyncio.shield(task)

    def refresh_if_stale(self) -> None:
        """Called on use: keys older than ``max_age`` are refetched without waiting for it."""
        if self._inflight is not None or self._fetched_at is None:
            return
        if self._clock() - self._fetched_at >= self._max_age and self._may_fetch():
            self._start_fetch()

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            try:
                await self._inflight
            except asyncio.CancelledError:
                pass

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or (
            self._clock() - self._attempted_at >= self._min_interval
        )

    def _start_fetch(self) -> asyncio.Task[None]:
        self._attempted_at = self._clock()
        self._inflight = asyncio.get_running_loop().create_task(self._fetch_and_install())
        return self._inflight

    async def _fetch_and_install(self) -> None:
        try:
            # The thread's own deadline ends it; this one ends the wait even if it does not.
            keys, skipped = await asyncio.wait_for(
                asyncio.to_thread(self._fetch, self.url, self._timeout), self._timeout + 1
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: keep the keys we have
            self._failing = True
            reason = str(exc) or type(exc).__name__
            self._warn.warning(
                "fetch",
                "JWKS fetch from %s failed, keeping the %d cached keys: %s",
                self._shown_url,
                len(self._keys),
                reason[:300],
            )
            return
        finally:
            self._inflight = None
        by_kid = {key.kid: key for key in keys}
        if by_kid.keys() != self._keys.keys() or self._failing:
            log.info(
                "JWKS from %s: %d signing keys %s",
                self._shown_url,
                len(by_kid),
                sorted(map(str, by_kid)),
            )
        if skipped:
            self._warn.warning(
                "skipped",
                "JWKS from %s: skipped keys: %s",
                self._shown_url,
                "; ".join(skipped)[:500],
            )
        self._keys = by_kid
        self._fetched_at = self._clock()
        self._failing = False
