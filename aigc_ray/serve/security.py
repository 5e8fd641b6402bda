"""API keys and the bind policy (no Ray): keys come from the environment or a file, never YAML."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from aigc_ray.errors import AigcRayError

API_KEYS_ENV = "AIGC_RAY_API_KEYS"
API_KEYS_FILE_ENV = "AIGC_RAY_API_KEYS_FILE"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServeError(AigcRayError, ValueError):
    """A serving-stage configuration problem found before deploying."""


def load_api_keys() -> list[str]:
    """API keys from $AIGC_RAY_API_KEYS (comma-separated) and/or the file named by
    $AIGC_RAY_API_KEYS_FILE (one per line)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    path = os.environ.get(API_KEYS_FILE_ENV)
    if path:
        try:
            keys += [k.strip() for k in Path(path).read_text().splitlines() if k.strip()]
        except OSError as e:
            raise ServeError(
                f"{API_KEYS_FILE_ENV}={path}: cannot read API keys file: {e}"
            ) from None
    return keys


def key_allowed(header: str | None, keys: list[str]) -> bool:
    """Constant-time check of an `Authorization: Bearer <key>` header against `keys`."""
    return not keys or request_key(header, keys) is not None


def request_key(header: str | None, keys: list[str]) -> str | None:
    """The configured key an `Authorization: Bearer <key>` header presents, or None; compared
    in constant time with every key (no early exit tells which one came close)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    given = token.strip().encode()
    found = None
    for k in keys:
        if hmac.compare_digest(given, k.encode()):
            found = k
    return found


def key_fingerprint(key: str | None) -> str:
    """What metrics and logs name a key by: the first 8 hex digits of its SHA-256 ("none" when
    the server has no keys). It identifies a key among a deployment's few; it cannot be turned
    back into the key."""
    if key is None:
        return "none"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def check_bind(host: str, keys: list[str]) -> None:
    """Refuse to publish the API beyond loopback without API keys."""
    if host not in LOOPBACK and not keys:
        raise ServeError(
            f"serve.host is {host}, which is not loopback: set {API_KEYS_ENV} or "
            f"{API_KEYS_FILE_ENV} before exposing the API"
        )
