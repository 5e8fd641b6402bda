"""Serving stage: an OpenAI-compatible API on Ray Serve.

`aigc_ray.serve:build_app` is the app builder for `serve run/deploy configs/serve.yaml`;
`run_serve` is what `aigc-ray serve` calls. See deployments.py for the
Router / ModelServer split and the ModelIngress that joins them.
"""

import importlib

# Loaded on first use (PEP 562), so `aigc_ray.serve.protocol` (the OpenAI request and response
# shapes) imports without Ray Serve, like the model and engine code.
_EXPORTS = {
    "build_app": "app",
    "deployment_options": "app",
    "engine_report": "app",
    "run_serve": "app",
    "ModelIngress": "deployments",
    "ModelServer": "deployments",
    "Router": "deployments",
    "ImageServer": "images",
    "DEFAULT_CHAT_TEMPLATE": "protocol",
    "ApiError": "protocol",
    "ChatCompletionRequest": "protocol",
    "ChunkWriter": "protocol",
    "CompletionRequest": "protocol",
    "Job": "protocol",
    "parse_json": "protocol",
    "render_chat": "protocol",
    "response_body": "protocol",
    "to_job": "protocol",
    "API_KEYS_ENV": "security",
    "API_KEYS_FILE_ENV": "security",
    "ServeError": "security",
    "check_bind": "security",
    "key_allowed": "security",
    "load_api_keys": "security",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aigc_ray.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aigc_ray.serve.{_EXPORTS[name]}"), name)


__all__ = [
    "API_KEYS_ENV",
    "API_KEYS_FILE_ENV",
    "DEFAULT_CHAT_TEMPLATE",
    "ApiError",
    "ChatCompletionRequest",
    "ChunkWriter",
    "CompletionRequest",
    "Job",
    "ImageServer",
    "ModelIngress",
    "ModelServer",
    "Router",
    "ServeError",
    "build_app",
    "check_bind",
    "deployment_options",
    "engine_report",
    "key_allowed",
    "load_api_keys",
    "parse_json",
    "render_chat",
    "response_body",
    "run_serve",
    "to_job",
]
