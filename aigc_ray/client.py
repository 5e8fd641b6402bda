"""A small HTTP client for our own endpoint (the standard library only): what the pipeline's
sample completions and the image flow's served samples use."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from aigc_ray.errors import PipelineError


def http_post(
    base_url: str, path: str, body: dict, timeout: float = 120, cafile: str | None = None
) -> dict:
    """POST JSON to the endpoint with the standard library (the first API key, if any; over
    HTTPS trusting `cafile`, else the system's CAs); the JSON reply, or PipelineError naming
    the status and body."""
    from aigc_ray.serve import load_api_keys

    headers = {"Content-Type": "application/json"}
    keys = load_api_keys()
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    req = urllib.request.Request(f"{base_url}{path}", json.dumps(body).encode(), headers)
    try:
        context = None
        if base_url.startswith("https://"):
            from aigc_ray.tls import ssl_context

            context = ssl_context(cafile)
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise PipelineError(f"POST {base_url}{path} -> {e.code}: {e.read().decode()}") from None


def http_complete(
    base_url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    timeout: float = 120,
    cafile: str | None = None,
) -> dict:
    """POST /v1/completions (greedy), returning the JSON body."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return http_post(base_url, "/v1/completions", body, timeout, cafile)
