"""Building and running the app: ``build_app(args)`` for `serve run/deploy` config files and
``run_serve`` for `aigc-ray serve`. Both validate args as ServeConfig first."""

from __future__ import annotations

import math
from typing import Any

from ray import serve

from aigc_ray.config import ServeConfig, ServedModel
from aigc_ray.serve.deployments import ModelServer, Router
from aigc_ray.serve.security import ServeError, check_bind, load_api_keys


def deployment_options(m: ServedModel) -> dict:
    """Serve options of one model's deployment (replicas or autoscaling, resources, queues)."""
    options: dict[str, Any] = {
        "name": f"model-{m.name}",
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
    }
    if m.autoscaling is not None:
        options["autoscaling_config"] = m.autoscaling.model_dump(exclude_none=True)
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = m.num_replicas
    return options


def _torch_threads(m: ServedModel) -> int | None:
    """CPU replicas use as many torch threads as CPUs they reserve (at least one)."""
    if m.num_gpus > 0:
        return None
    return max(1, math.floor(m.num_cpus))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Typed app builder: `args` are ServeConfig fields (model_dir or models required)."""
    from aigc_ray.model import check_model_dir, portable_location

    cfg = ServeConfig(**args)  # a pydantic ValidationError names any unknown or bad arg
    try:
        models = cfg.served_models()
    except ValueError as e:
        raise ServeError(str(e)) from None
    handles = {}
    for m in models:
        check_model_dir(m.model_dir)
        device = m.device if m.device != "auto" or m.num_gpus == 0 else "cuda"
        handles[m.name] = ModelServer.options(**deployment_options(m)).bind(
            m.name, portable_location(m.model_dir), device, m.dtype, m.max_batch_size,
            _torch_threads(m), m.stream_chunks_per_s)  # fmt: skip
    return Router.bind(handles, cfg.max_tokens_limit, cfg.request_timeout_s)


def run_serve(cfg: ServeConfig, model_dir: str | None = None, app_name: str = "aigc") -> str:
    """Deploy on the connected Ray cluster; return the base URL. Returns once replicas are ready.
    ``model_dir`` fills in serve.model_dir when the config leaves it empty."""
    check_bind(cfg.host, load_api_keys())
    # exclude_unset keeps serve.models entries inheriting what they leave out
    args = cfg.model_dump(exclude_unset=True)
    if model_dir and not cfg.models:
        args["model_dir"] = model_dir
    app = build_app(args)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=app_name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"
