"""Keys, JWKs and hostile tokens for the identity-provider tests (unit and integration)."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def generate_keys() -> dict[str, Any]:
    """Private keys by the kid the tests publish them under."""
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


def _segment(data: Any) -> str:
    return b64(data if isinstance(data, bytes) else json.dumps(data).encode())


def hostile_tokens(keys: dict[str, Any]) -> dict[str, str]:
    """Tokens no verifier may accept, against a JWKS publishing ``keys`` as rsa, rsa-rs256
    (alg RS256), p256 and ed (see ``published``), with the HS256 secret configured too."""
    payload = _segment(claims())
    rsa_pem = pem(keys["rsa"]).encode()
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def raw(header: Any, signature: bytes = b"sig") -> str:
        return f"{_segment(header)}.{payload}.{b64(signature)}"

    def hs256_with(secret: bytes, **headers: Any) -> str:
        signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', **headers})}.{payload}"
        mac = hmac.new(secret, signing_input.encode(), "sha256").digest()
        return f"{signing_input}.{b64(mac)}"

    return {
        "alg_none": raw({"alg": "none", "kid": "rsa"}, b""),
        "alg_None": raw({"alg": "None"}, b""),
        "no_alg": raw({"kid": "rsa"}),
        "alg_list": raw({"alg": ["RS256"], "kid": "rsa"}),
        "alg_object": raw({"alg": {"x": 1}, "kid": "rsa"}),
        "kid_number": raw({"alg": "RS256", "kid": 7}),
        "kid_object": raw({"alg": "RS256", "kid": {"a": 1}}),
        "hs256_with_public_pem": hs256_with(rsa_pem, kid="rsa"),
        "hs384_with_public_pem": raw({"alg": "HS384", "kid": "rsa"}),
        "wrong_key_type": jwt.encode(claims(), keys["p256"], "ES256", headers={"kid": "rsa"}),
        "rsa_token_ec_kid": jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "p256"}),
        "wrong_curve": jwt.encode(claims(), keys["p384"], "ES384", headers={"kid": "p256"}),
        "wrong_curve_es256": raw({"alg": "ES256", "kid": "p256"}, b"x" * 96),
        "eddsa_on_rsa": jwt.encode(claims(), keys["ed"], "EdDSA", headers={"kid": "rsa"}),
        "other_rsa_key": jwt.encode(claims(), other_rsa, "RS256", headers={"kid": "rsa"}),
        "embedded_jwk": jwt.encode(
            claims(),
            other_rsa,
            "RS256",
            headers={"kid": "rsa", "jwk": RSAAlgorithm.to_jwk(other_rsa.public_key(), True)},
        ),
        "jku": jwt.encode(
            claims(), other_rsa, "RS256", headers={"kid": "x", "jku": "https://evil/"}
        ),
        "unknown_kid": jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "nope"}),
        "long_kid": jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "k" * 1000}),
        "huge_kid": jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "k" * 3000}),
        "huge_header": raw({"alg": "RS256", "pad": "x" * 5000}),
        "non_json_header": f"{b64(b'{not json')}.{payload}.sig",
        "header_list": raw(["alg", "RS256"]),
        "header_deep": f"{b64(b'[' * 1000)}.{payload}.sig",
        "header_not_base64": f"!!!.{payload}.sig",
        "header_not_utf8": f"{b64(bytes([0xFF, 0xFE]))}.{payload}.sig",
        "crit_unknown": raw({"alg": "RS256", "kid": "rsa", "crit": ["exp"]}),
        "b64_false": raw({"alg": "RS256", "kid": "rsa", "b64": False}),
        "two_segments": f"{_segment({'alg': 'RS256'})}.{payload}",
        "empty": "",
        "dots": "..",
        "payload_list": f"{_segment({'alg': 'RS256', 'kid': 'rsa'})}.{_segment([1])}.sig",
        "ps256_on_rs256_jwk": jwt.encode(
            claims(), keys["rsa"], "PS256", headers={"kid": "rsa-rs256"}
        ),
    }


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, **extra}


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "u-1", "exp": int(time.time()) + 300, **extra}


def published(keys: dict[str, Any]) -> list[dict[str, Any]]:
    """The JWKS entries ``hostile_tokens`` expects (p384 is the attacker's: not published)."""
    return [
        jwk(keys["rsa"], "rsa"),
        jwk(keys["rsa"], "rsa-rs256", alg="RS256"),
        jwk(keys["p256"], "p256"),
        jwk(keys["ed"], "ed"),
    ]
