"""API keys and the bind policy (no Ray): keys come from the environment or a file, never YAML."""

from __future__ import annotations

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
    if not keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    return any(hmac.compare_digest(given, k.encode()) for k in keys)


def check_bind(host: str, keys: list[str]) -> None:
    """Refuse to publish the API beyond loopback without API keys."""
    if host not in LOOPBACK and not keys:
        raise ServeError(
            f"serve.host is {host}, which is not loopback: set {API_KEYS_ENV} or "
            f"{API_KEYS_FILE_ENV} before exposing the API"
        )
