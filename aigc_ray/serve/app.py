"""Building and running the app: ``build_app(args)`` for `serve run/deploy` config files and
``run_serve`` for `aigc-ray serve`. Both validate args as ServeConfig first."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from aigc_ray.config import ServeConfig, ServedModel
from aigc_ray.serve.deployments import ModelIngress, ModelServer, Router
from aigc_ray.serve.images import ImageServer
from aigc_ray.serve.routing import AdapterRouter, haproxy_build
from aigc_ray.serve.security import ServeError, check_bind, load_api_keys

logger = logging.getLogger(__name__)


def deployment_options(m: ServedModel) -> dict:
    """Serve options of one model's deployment (replicas or autoscaling, resources, queues).

    A vLLM replica spanning several GPUs (``vllm.tensor_parallel_size`` > 1) reserves them in a
    placement group on one node, as Ray Serve LLM does: the replica actor holds the CPUs of the
    first bundle and no GPU, and vLLM's Ray workers take one GPU bundle each."""
    options: dict[str, Any] = {
        "name": f"model-{m.name}",
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
        "max_surge_percent": m.rollout_surge_percent,
    }
    tp = m.vllm.tensor_parallel_size
    if tp > 1:
        if m.engine == "builtin":
            raise ServeError(
                f"serve model {m.name}: vllm.tensor_parallel_size={tp} needs "
                "engine vllm or auto (the builtin engine runs on one device)"
            )
        if m.num_gpus != tp:
            raise ServeError(
                f"serve model {m.name}: num_gpus ({m.num_gpus:g}) must equal "
                f"vllm.tensor_parallel_size ({tp}), the GPUs one replica spans"
            )
        options["ray_actor_options"] = {"num_cpus": m.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = [{"CPU": m.num_cpus, "GPU": 1}] + [
            {"GPU": 1} for _ in range(tp - 1)
        ]
        options["placement_group_strategy"] = "STRICT_PACK"
    if m.autoscaling is not None:
        options["autoscaling_config"] = m.autoscaling.model_dump(exclude_none=True)
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = m.num_replicas
    return options


SAME_THREAD = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
INGRESS_HEADROOM = 16  # requests past the capacity that reach the replica's own 503


def ingress_options(m: ServedModel) -> dict:
    """A ModelIngress's Serve options: the model's, with the queue moved into the replica.
    Serve admits every request its capacity allows, and a few more, so that the replica itself
    answers the ones beyond it with an OpenAI-shaped 503 (Serve's own is plain text)."""
    from aigc_ray.serve.deployments import ingress_capacity

    options = deployment_options(m)
    # Serve runs user code on an event loop of its own thread by default, and hands every ASGI
    # message of a response to the replica's HTTP server on another loop: one hop between
    # threads per streamed chunk. Our code never blocks its loop once constructed (the engines
    # decode in a thread or process), so it runs on Serve's loop here. bench_serve, built-in
    # engine, c=32: one chunk per token cost 14% of tok/s across the hop (782 -> 675 tok/s) and
    # 2% without it (769 tok/s, chunk gap p50 35 ms).
    options["ray_actor_options"]["runtime_env"] = {"env_vars": {SAME_THREAD: "0"}}
    capacity = ingress_capacity(m)
    if capacity is not None:
        options["max_ongoing_requests"] = capacity + INGRESS_HEADROOM
        options["max_queued_requests"] = -1
    return options


def check_engine(m: ServedModel) -> None:
    """``engine: vllm`` on a model vLLM cannot serve is an error now, naming the model and the
    reason, not a replica that fails to start again and again. Checked where vLLM is installed
    (on a cluster, the GPU replicas check it themselves when they start)."""
    from aigc_ray.engine import choose_engine, vllm_distribution
    from aigc_ray.engine.loader import placed_device
    from aigc_ray.engine.params import EngineUnavailableError
    from aigc_ray.storage import is_uri

    if m.engine != "vllm" or vllm_distribution() is None or is_uri(m.model_dir):
        return
    try:
        choose_engine("vllm", m.model_dir, placed_device(m.device, m.num_gpus))
    except EngineUnavailableError as e:
        raise ServeError(f"serve model {m.name}: {e}") from None


def build_app(args: dict[str, Any], haproxy: bool | None = None) -> serve.Application:
    """Typed app builder: `args` are ServeConfig fields (model_dir or models required).
    `haproxy`: whether Serve's controller runs HAProxy (then a direct app whose model has
    adapters gets serve.routing's AdapterRouter); None reads Ray's setting in this process, as
    for `serve run/deploy` config files."""
    from aigc_ray.images.model import is_image_model_dir
    from aigc_ray.model import check_model_dir
    from aigc_ray.storage import model_version, portable_location

    cfg = ServeConfig(**args)  # a pydantic ValidationError names any unknown or bad arg
    try:
        models = cfg.served_models()
    except ValueError as e:
        raise ServeError(str(e)) from None
    handles, image_models, versions, adapters = {}, [], {}, {}
    for m in models:
        # A new version (or the same path with new files) changes the deployment's arguments:
        # Serve replaces its replicas one by one, starting each new one before stopping an old.
        versions[m.name] = m.version or model_version(m.model_dir)
        fields = {
            **m.model_dump(),
            "model_dir": portable_location(m.model_dir),
            "version": versions[m.name],
        }
        if is_image_model_dir(m.model_dir):
            if m.adapters:
                raise ServeError(f"model {m.name}: LoRA adapters are for text models")
            handles[m.name] = ImageServer.options(**deployment_options(m)).bind(fields)
            image_models.append(m.name)
            continue
        check_model_dir(m.model_dir)
        check_engine(m)
        if cfg.ingress == "direct" and len(models) == 1:  # the model's replicas take HTTP
            app = ModelIngress.options(**ingress_options(m)).bind(
                fields, cfg.max_tokens_limit, cfg.request_timeout_s, cfg.log_prompts
            )
            if m.adapters and _haproxy_on(haproxy):  # an adapter's requests to its holder
                app._with_ingress_request_router(AdapterRouter.bind(app, sorted(m.adapters)))
            return app
        handles[m.name] = ModelServer.options(**deployment_options(m)).bind(fields)
        adapters.update(dict.fromkeys(m.adapters, m.name))
    if cfg.ingress == "direct":
        logger.info(
            "serve.ingress direct serves an app of one text model; this app's %d model(s) "
            "(%s) are reached through the Router",
            len(models),
            ", ".join(m.name for m in models),
        )
    # The versions reach the Router as user_config: deployed from a config file (`serve deploy`,
    # a stable code version), a new one reconfigures the running Router in place. `serve.run`
    # gives every changed deployment a new code version, so there the Router is replaced, new
    # replica first (max_surge_percent), like the models.
    router = Router.options(
        user_config={"versions": versions}, max_surge_percent=cfg.rollout_surge_percent
    )
    return router.bind(
        handles,
        cfg.max_tokens_limit,
        cfg.request_timeout_s,
        image_models=image_models,
        max_images=cfg.max_images_per_request,
        log_prompts=cfg.log_prompts,
        adapters=adapters,
    )


def _haproxy_on(haproxy: bool | None) -> bool:
    if haproxy is None:
        from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY

        return bool(RAY_SERVE_ENABLE_HA_PROXY)
    return haproxy


def run_serve(cfg: ServeConfig, model_dir: str | None = None, app_name: str = "aigc") -> str:
    """Deploy on the connected Ray cluster; return the base URL. Returns once replicas are ready.
    ``model_dir`` fills in serve.model_dir when the config leaves it empty."""
    check_bind(cfg.host, load_api_keys())
    http_options = {"host": cfg.host, "port": cfg.port}
    if cfg.tls_certfile:  # HTTPS on Serve's proxy; the files checked before anything starts
        from aigc_ray.tls import check_tls_files

        check_tls_files(cfg.tls_certfile, cfg.tls_keyfile, cfg.tls_ca_file, what="serve")
        http_options |= {"ssl_certfile": cfg.tls_certfile, "ssl_keyfile": cfg.tls_keyfile}
    # exclude_unset keeps serve.models entries inheriting what they leave out
    args = cfg.model_dump(exclude_unset=True)
    if model_dir and not cfg.models:
        args["model_dir"] = model_dir
    from aigc_ray.serve.ingress import controller_options

    options = controller_options(cfg.ingress, bool(cfg.tls_certfile))  # None: Serve's proxy
    app = build_app(args, haproxy=options is not None)
    serve.start(
        http_options=http_options,
        proxy_location=cfg.proxy_location,
        controller_options=options,
    )
    try:
        with haproxy_build(options is not None):
            serve.run(app, name=app_name, route_prefix="/", blocking=False)
    except RuntimeError as e:  # Serve says only "Failed to update the deployments [...]"
        reasons = deploy_failures(app_name)
        serve.delete(app_name)  # no replica left retrying a constructor that fails
        raise ServeError(
            f"app {app_name!r} failed to deploy and was deleted: " + ("; ".join(reasons) or str(e))
        ) from None
    url = f"{cfg.scheme}://{cfg.host}:{cfg.port}"
    if options:  # HAProxy learns the new routes a reload after Serve says RUNNING
        _wait_for_route(url)
    return url


def _wait_for_route(url: str, timeout_s: float = 60) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"the app is deployed; {url}/health did not answer in {timeout_s} s")
        time.sleep(0.5)


def deploy_failures(app_name: str) -> list[str]:
    """'<deployment>: <the exception its replicas raised>' for each deployment of the app that
    failed, the exception read from the traceback Serve keeps in the deployment's status."""
    from aigc_ray.errors import root_cause

    try:
        deployments = serve.status().applications[app_name].deployments
    except KeyError:
        return []
    return [
        f"{name}: {root_cause(d.message) or d.message.strip()[-500:]}"
        for name, d in deployments.items()
        if str(d.status).endswith(("DEPLOY_FAILED", "UNHEALTHY"))
    ]


def engine_report(app_name: str = "aigc") -> dict[str, dict]:
    """{model: info} from each model deployment that has a running replica (engine, reason)."""
    status = serve.status().applications[app_name].deployments
    names = [
        n
        for n, d in status.items()
        if n.startswith("model-") and d.replica_states.get("RUNNING", 0)
    ]

    async def ask() -> list[dict]:  # handles are used from a loop (any Serve mode)
        calls = [serve.get_deployment_handle(n, app_name).info.remote() for n in names]
        return [await asyncio.wait_for(c, 60) for c in calls]

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop in this thread
        infos = asyncio.run(ask())
    else:  # called from a running loop (a notebook): run ours on a thread of its own
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            infos = pool.submit(asyncio.run, ask()).result()
    return {info["model"]: info for info in infos}
