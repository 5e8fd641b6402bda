"""Serving stage: an OpenAI-compatible API on Ray Serve.

`aigc_ray.serve:build_app` is the app builder for `serve run/deploy configs/serve.yaml`;
`run_serve` is what `aigc-ray serve` calls. See deployments.py for the Router / ModelServer split.
"""

from aigc_ray.serve.app import build_app, deployment_options, engine_report, run_serve
from aigc_ray.serve.deployments import ModelServer, Router
from aigc_ray.serve.protocol import (
    DEFAULT_CHAT_TEMPLATE,
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    Job,
    parse_json,
    render_chat,
    response_body,
    to_job,
)
from aigc_ray.serve.security import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    ServeError,
    check_bind,
    key_allowed,
    load_api_keys,
)

__all__ = [
    "API_KEYS_ENV",
    "API_KEYS_FILE_ENV",
    "DEFAULT_CHAT_TEMPLATE",
    "ApiError",
    "ChatCompletionRequest",
    "ChunkWriter",
    "CompletionRequest",
    "Job",
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
