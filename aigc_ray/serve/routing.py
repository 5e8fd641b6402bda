"""The direct path's choice of replica for apps whose model has LoRA adapters.

Under serve.ingress direct, HAProxy forwards each request to a ModelIngress replica; by itself it
balances load and never reads the body, so an adapter's requests would land on every replica and
each would load it. For an app with adapters, ``AdapterRouter`` is attached as Serve's ingress
request router (Ray 2.60, the mechanism of Ray Serve LLM's direct streaming): HAProxy posts each
request's body to its ``/internal/route`` (RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY, set by
serve.ingress.controller_options) and forwards the request to the replica it names. A request
whose ``model`` is an adapter is routed as Serve's multiplexed model id, so it goes to a replica
that already holds the adapter (each ModelIngress notes its adapters with ``serve.multiplexed``,
an LRU of max_loras names), and the id reaches that replica in a header HAProxy sets (it drops
one a client sends). Other requests take Serve's load-balanced pick.

The cost is one small HTTP call per request from HAProxy to this deployment, so apps without
adapters are not given one. Serve's ingress request router hook is marked internal in Ray 2.60
(``Application._with_ingress_request_router``); it is used here as Ray Serve LLM uses it."""

import contextlib
import json

from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve._private.constants import (
    RAY_SERVE_INGRESS_REQUEST_ROUTER_OPT_HEADERS_FIELD as HEADERS,
)
from ray.serve._private.constants import SERVE_MULTIPLEXED_MODEL_ID
from ray.serve.exceptions import DeploymentUnavailableError

route_api = FastAPI()


def requested_model(body: bytes) -> str:
    """The `model` of an OpenAI request body; "" when the body is not a JSON object naming one
    (the replica then answers the request's error itself)."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=5)
@serve.ingress(route_api)
class AdapterRouter:
    """Picks the ModelIngress replica for each request HAProxy asks about (see the module)."""

    def __init__(self, server, adapters: list[str]):
        self._server = server
        self._adapters = frozenset(adapters)

    @route_api.post("/internal/route")
    async def route(self, request: Request) -> dict:
        model = requested_model(await request.body())
        adapter = model if model in self._adapters else ""
        handle = self._server.options(multiplexed_model_id=adapter) if adapter else self._server
        try:
            async with handle.choose_replica(_reserve=False) as picked:
                replica = picked._replica
                endpoint = replica.backend_http_endpoint
                if endpoint is None:
                    raise RuntimeError(f"replica {picked.replica_id} has no HTTP endpoint yet")
                host, port = endpoint
                chosen = {"host": host, "port": port}
                chosen["replica_id"] = replica.replica_id.to_full_id_str()
        except (RuntimeError, DeploymentUnavailableError) as e:
            raise HTTPException(status_code=503, detail=str(e)) from None  # HAProxy: a 503
        if adapter:
            chosen[HEADERS] = {SERVE_MULTIPLEXED_MODEL_ID: adapter}
        return chosen

    @route_api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}


@contextlib.contextmanager
def haproxy_build(attached: bool):
    """Serve checks, in the process that builds an app, that HAProxy is on before it accepts an
    ingress request router; it reads that from this process's environment, while aigc-ray turns
    HAProxy on in the controller's (serve.ingress). When `attached` (the controller was started
    with HAProxy by run_serve), the check is told so for the build."""
    if not attached:
        yield
        return
    from ray.serve._private import build_app

    saved = build_app.RAY_SERVE_ENABLE_HA_PROXY
    build_app.RAY_SERVE_ENABLE_HA_PROXY = True
    try:
        yield
    finally:
        build_app.RAY_SERVE_ENABLE_HA_PROXY = saved
