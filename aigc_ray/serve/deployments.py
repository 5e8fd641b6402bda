"""The Serve deployments of the app.

- ``ModelServer`` (one deployment per model, its own replicas, resources and autoscaling): one
  GenerationEngine doing continuous batching; validates prompts against the model's tokenizer and
  context window, and records token-level metrics.
- ``Router`` (the FastAPI ingress in front of several models): the OpenAI surface
  (``OpenAISurface``: API keys, JSON parsing and validation, routing by the request's ``model``,
  the request timeout (408), overload and replica failures (503), server-sent events, request
  metrics and usage per key). It holds no model; Serve's backpressure (``max_queued_requests``)
  and replica deaths are raised into its handle calls and leave in OpenAI's error shape.
- ``ModelIngress`` (serve.ingress direct, an app of one text model): a ModelServer that serves the
  OpenAI surface itself, calling its engine in-process (``LocalHandle``), so HAProxy forwards to
  it and no Python hop is left. It answers past its own queue with OpenAI's 503.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations at runtime.
import asyncio
import dataclasses
import logging
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_ray.config import ServedModel
from aigc_ray.engine import (
    AdapterError,
    ContextLengthError,
    EngineDeadError,
    EngineError,
    EngineRequest,
    InvalidParamError,
    load_engine,
)
from aigc_ray.engine.loader import cpu_threads, placed_device
from aigc_ray.engine.params import usable_device
from aigc_ray.serve.images import ImageGenerationRequest, image_job, images_response
from aigc_ray.serve.metrics import KeyUsageMetrics, ModelMetrics, RouterMetrics
from aigc_ray.serve.privacy import PromptGuard
from aigc_ray.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    Job,
    StreamEvent,
    chat_logprobs,
    completion_logprobs,
    render_chat,
    response_body,
    to_job,
    usage,
)
from aigc_ray.serve.security import key_allowed, key_fingerprint, load_api_keys, request_key

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model server


def _vllm_stat_loggers() -> list:
    """vLLM's own Prometheus metrics (KV-cache usage, running/waiting, latencies...) exported
    through Ray's metrics agent, as Ray Serve LLM does."""
    try:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:
        return []
    return [RayPrometheusStatLogger]


@serve.deployment(health_check_period_s=5)
class ModelServer:
    """One model: an engine (built-in or vLLM) with continuous batching, shared by all requests
    to this replica. ``model`` is a ServedModel's fields (validated again here)."""

    # Behind the Router every chunk crosses two more Python processes, so under load chunks
    # carry several tokens (docs/serving.md); ModelIngress, which takes HTTP itself, sends one
    # per token.
    DEFAULT_CHUNKS_PER_S = 330.0

    def __init__(self, model: dict):
        import torch

        self.cfg = cfg = ServedModel(**model)
        threads = cpu_threads(cfg.num_cpus, cfg.num_gpus)
        if threads:
            torch.set_num_threads(threads)
        self.name, self.version = cfg.name, cfg.version
        self.replica = _replica_id()
        device = usable_device(placed_device(cfg.device, cfg.num_gpus), f"replica of {cfg.name}")
        self.engine, self.choice = load_engine(
            cfg.model_dir,
            engine=cfg.engine,
            device=device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            max_model_len=cfg.max_model_len,
            vllm=cfg.vllm.model_dump(),
            stat_loggers=_vllm_stat_loggers(),
            adapters=cfg.adapters,
            max_loras=cfg.max_loras,
            max_lora_rank=cfg.max_lora_rank,
            # Serve runs a constructor on the replica's loop (no loop: in-process tests)
            on_caller_loop=asyncio._get_running_loop() is not None,
        )
        self.metrics = ModelMetrics(cfg.name)
        self.open = 0  # engine requests submitted and not yet finished

        # Routed by the Router (or, on the direct path, serve.routing's AdapterRouter), a
        # request naming an adapter carries it as Serve's multiplexed model id. Noting it here
        # (Serve's multiplexing, an LRU of max_loras ids per replica, as the engine keeps) tells
        # Serve's routers this replica holds it, so the adapter's next requests come here, not
        # to a replica that would load it again.
        async def adapter_id(name: str) -> str:  # Serve keeps the name; the engine the weights
            return name

        self._hold_adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_loras)(adapter_id)
        chunks = cfg.stream_chunks_per_s
        self.chunks_per_s = self.DEFAULT_CHUNKS_PER_S if chunks is None else chunks
        self.max_interval = cfg.stream_max_interval_s
        log.info(
            "model %s ready from %s: engine %s (%s)",
            cfg.name,
            cfg.model_dir,
            self.choice.name,
            self.choice.reason,
        )

    async def _submit(self, job: Job, stream: bool) -> tuple[list[EngineRequest], list[list[int]]]:
        """Validate the job against this model and queue its prompts x n engine requests."""
        routed = job.adapter and serve.get_multiplexed_model_id() == job.adapter
        if routed and job.adapter in self.cfg.adapters:
            await self._hold_adapter(job.adapter)
        params = job.params
        if job.kind == "chat":
            prompt, extra_stop = render_chat(self.engine.tokenizer, job.messages)
            params.stop = [*params.stop, *extra_stop]
            prompts = [self.engine.encode(prompt, add_special_tokens=False)]
            if not job.max_tokens_given:
                room = self.engine.context_window - len(prompts[0])
                params.max_tokens = max(1, min(params.max_tokens, room))
        else:
            prompts = [p if isinstance(p, list) else self.engine.encode(p) for p in job.prompts]
        reqs: list[EngineRequest] = []
        try:  # choice i of a prompt gets seed + i, so n choices differ but repeat with the seed
            for ids in prompts:
                for i in range(job.n):
                    seed = params.seed + i if params.seed is not None else None
                    sp = _with_seed(params, seed)
                    reqs.append(await self.engine.asubmit(ids, sp, stream, job.adapter))
        except ContextLengthError as e:
            _cancel(reqs)
            raise ApiError(400, str(e), param=e.param, code="context_length_exceeded") from None
        except AdapterError as e:  # unknown (404), or unusable: unreadable, other base, rank
            _cancel(reqs)
            if e.status == 404:
                raise _model_not_found(str(e)) from None
            raise ApiError(400, str(e), param="model", code="adapter_unusable") from None
        except InvalidParamError as e:
            _cancel(reqs)
            raise ApiError(400, str(e), param=e.param) from None
        except EngineError as e:
            _cancel(reqs)
            raise _engine_failure(e) from None
        self.metrics.update(self.engine.stats())
        self.open += len(reqs)
        return reqs, prompts

    def _finished(self, reqs: list[EngineRequest]) -> None:
        self.open -= len(reqs)
        for req in reqs:
            req.cancel()  # no-op when finished
            if req.done and req.first_token_at is not None:
                self.metrics.observe_request(req)
        self.metrics.update(self.engine.stats())

    async def complete(self, job: Job) -> dict:
        """Whole completions: {"prompt_tokens", "choices": [...], "engine"} or {"error": ...}."""
        try:
            reqs, prompts = await self._submit(job, stream=False)
        except ApiError as e:
            return {"error": e.to_dict()}
        try:
            results = [await r.aresult() for r in reqs]
        except EngineError as e:
            return {"error": _engine_failure(e).to_dict()}
        finally:
            self._finished(reqs)
        choices = [self._choice(job, prompts[i // job.n], r) for i, r in enumerate(results)]
        return {
            "prompt_tokens": sum(len(p) for p in prompts),
            "choices": choices,
            "engine": self.choice.name,
            "version": self.version,
            "replica": self.replica,
        }

    def _choice(self, job: Job, prompt_ids: list[int], r) -> dict:
        """One choice's text, finish reason, token count and logprobs (echo: prompt first)."""
        tok = self.engine.tokenizer
        ids, entries, text = r.token_ids, r.logprobs, r.text
        if job.score_only:
            ids, entries, text = [], [] if entries is not None else None, ""
        prefix = ""
        if job.echo:
            prefix = tok.decode(prompt_ids, skip_special_tokens=False)
            if entries is not None:
                ids = [*prompt_ids, *ids]
                entries = [*(r.prompt_logprobs or [None] * len(prompt_ids)), *entries]
        logprobs = None
        if entries is not None:
            if job.kind == "chat":
                logprobs = chat_logprobs(tok, ids, entries)
            else:
                logprobs = completion_logprobs(tok, ids, entries)
        return {
            "text": prefix + text,
            "finish_reason": r.finish_reason,
            "completion_tokens": 0 if job.score_only else r.completion_tokens,
            "logprobs": logprobs,
        }

    async def stream(self, job: Job):
        """StreamEvents: start (prompt tokens) or error, then delta and finish events per
        choice. Deltas produced between two reads
        are sent as one, so a busy replica sends fewer, larger chunks."""
        if job.params.logprobs is not None or job.echo:
            err = ApiError(400, "logprobs and echo need stream: false", param="stream")
            yield StreamEvent("error", error=err.to_dict())
            return
        try:
            reqs, prompts = await self._submit(job, stream=True)
        except ApiError as e:
            yield StreamEvent("error", error=e.to_dict())
            return
        try:
            yield StreamEvent(
                "start",
                tokens=sum(len(p) for p in prompts),
                version=self.version,
                replica=self.replica,
            )
            async for event in _merge(reqs, self._stream_interval):
                yield event
        except EngineError as e:
            yield StreamEvent("error", error=_engine_failure(e).to_dict())
        finally:
            self._finished(reqs)

    def _stream_interval(self) -> float:
        """Seconds between two chunks of one stream: every request streams token by token until
        the replica's running requests would exceed ``stream_chunks_per_s`` chunks in total;
        then chunks carry several tokens (each chunk costs CPU in the router and the proxy), but
        never more than ``stream_max_interval_s`` apart."""
        if not self.chunks_per_s:
            return 0.0
        return min(self.max_interval, self.engine.num_running / self.chunks_per_s)

    async def info(self) -> dict:
        """The engine serving this model and why (aigc-ray serve prints it; /v1/models shows it)."""
        return {
            "model": self.name,
            "version": self.version,
            **self.choice.as_dict(),
            "context_window": self.engine.context_window,
        }

    async def stats(self) -> dict:
        """Engine counters, the engine's name and this replica's pid (tests and debugging)."""
        out = {
            "pid": os.getpid(),
            "replica": self.replica,
            "model": self.name,
            "engine": self.choice.name,
            "thread": threading.current_thread().name,  # where Serve runs this replica's code
            **self.engine.stats(),
        }
        if hasattr(self.engine, "engine_pids"):
            out["engine_pids"] = self.engine.engine_pids()
            out["vllm_on_replica_loop"] = self.engine.on_caller_loop
            isolation = getattr(self.engine, "isolation", None)
            out["cpu_isolation"] = isolation.describe() if isolation is not None else None
        return out

    def check_health(self) -> None:
        """Serve's health check: a dead engine (vLLM's process gone) fails it, so Serve replaces
        this replica while requests in flight get 503s."""
        if getattr(self.engine, "dead", False):
            raise RuntimeError(f"model {self.name}: the {self.choice.name} engine is dead")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _replica_id() -> str:
    """This replica's Serve id (its pid outside Serve, e.g. in unit tests): responses name it in
    the ``x-aigc-replica`` header, so operators and tests see which replica answered."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not running in a Serve replica
        return f"pid-{os.getpid()}"


def _cancel(reqs: list[EngineRequest]) -> None:
    for req in reqs:
        req.cancel()


def _with_seed(params, seed):
    return dataclasses.replace(params, seed=seed, stop=list(params.stop))


def _engine_failure(e: EngineError) -> ApiError:
    if isinstance(e, EngineDeadError):
        return ApiError(
            503,
            f"model replica unavailable ({e}); retry",
            "server_unavailable",
            code="replica_unavailable",
        )
    return ApiError(500, str(e), "server_error")


async def _merge(reqs: list[EngineRequest], interval):
    """Interleave the delta streams of n requests as delta / finish StreamEvents."""

    def finish(i: int, req: EngineRequest) -> StreamEvent:
        result = req.result()
        reason, tokens = result.finish_reason, result.completion_tokens
        return StreamEvent("finish", i, finish_reason=reason, tokens=tokens)

    if len(reqs) == 1:
        async for text in reqs[0].adeltas(interval):
            yield StreamEvent("delta", 0, text)
        yield finish(0, reqs[0])
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: EngineRequest) -> None:
        try:
            async for text in req.adeltas(interval):
                queue.put_nowait(StreamEvent("delta", i, text))
            queue.put_nowait(finish(i, req))
        except EngineError as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            event = await queue.get()
            if isinstance(event, EngineError):
                raise event
            left -= event.kind == "finish"
            yield event
    finally:
        for task in tasks:
            task.cancel()


# ---------------------------------------------------------------- router (ingress)


async def _on_validation_error(request, exc):
    return ApiError(400, str(exc.errors()[0].get("msg"))).response()


async def _on_http_error(request, exc):
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, str(exc.detail), type_).response()


def _openai_api() -> FastAPI:
    """A FastAPI app whose own errors (unknown route, bad JSON) leave in OpenAI's shape."""
    app = FastAPI(title="aigc_ray OpenAI-compatible API")
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    return app


api = _openai_api()  # the Router's routes
direct_api = _openai_api()  # a ModelIngress's routes (one model, its replicas take HTTP)


def _failure(e: BaseException, guard: PromptGuard) -> ApiError:
    """An exception from a model deployment call, as the error the client gets (an unexpected
    one is logged without the request's texts)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BackPressureError):
        return _overloaded()
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return ApiError(408, "request timed out", "timeout", code="timeout")
    if isinstance(
        e,
        RayActorError
        | ReplicaUnavailableError
        | DeploymentUnavailableError
        | RequestCancelledError,
    ):
        return ApiError(
            503,
            f"model replica unavailable ({type(e).__name__}); retry",
            "server_unavailable",
            code="replica_unavailable",
        )
    guard.log_failure("unexpected error from a model deployment", e)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


def _model_not_found(message: str) -> ApiError:
    return ApiError(404, message, "not_found_error", "model", "model_not_found")


def _overloaded() -> ApiError:
    return ApiError(
        503,
        "the model's request queue is full; retry shortly",
        "server_overloaded",
        code="overloaded",
    )


def _loop_deadline(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _replica_header(replica: str | None) -> dict[str, str]:
    """The header naming the model replica that answered (none when it did not say)."""
    return {"x-aigc-replica": replica} if replica else {}


def _auth_error() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key (Authorization: Bearer <key>)",
        "authentication_error",
        code="invalid_api_key",
    )


class OpenAISurface:
    """The OpenAI HTTP API over model servers reached through handles: API keys, parsing and
    validation, routing by ``model``, the request timeout (408), overload and replica failures
    (503), server-sent events, request metrics and usage per key, no texts in logs. The Router
    serves it in front of one deployment per model; a ModelIngress serves it for its own engine
    (its handle is a LocalHandle). The routes are each class's own (Serve binds FastAPI routes
    to the class that defines them)."""

    def _init_surface(
        self,
        models: dict,
        max_tokens_limit: int,
        request_timeout_s: float,
        image_models: list[str] | None = None,
        max_images: int = 10,
        log_prompts: bool = False,
        adapters: dict[str, str] | None = None,
    ) -> None:
        self.models = models  # name -> DeploymentHandle of its ModelServer (or ImageServer)
        self.adapters = dict(adapters or {})  # LoRA adapter name -> its base model's name
        self.image_models = set(image_models or [])
        self.max_images = max_images
        self.limit, self.timeout = max_tokens_limit, request_timeout_s
        self.keys = load_api_keys()
        self.created = int(time.time())
        self.route_metrics = RouterMetrics()
        self.usage = KeyUsageMetrics()
        self.log_prompts = log_prompts
        self.engines: dict[str, str] = {}  # model -> engine, learnt from its responses
        # model -> version: as deployed, then as its responses say (during a rolling update,
        # whichever replica answered last)
        self.versions: dict[str, str] = {}

    def _health(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    def _list_models(self, request: Request):
        if not key_allowed(request.headers.get("authorization"), self.keys):
            return self._record("", "models", _auth_error())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "aigc_ray",
                "engine": self.engines.get(name),
                "version": self.versions.get(name),
            }
            for name in self.models
        ]
        cards += [  # as vLLM lists its LoRA adapters: the base model is the parent
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "aigc_ray",
                "parent": base,
                "engine": self.engines.get(base),
                "version": self.versions.get(base),
            }
            for name, base in self.adapters.items()
        ]
        return {"object": "list", "data": cards}

    async def _images(self, request: Request):
        deadline = time.monotonic() + self.timeout
        model, route = "", "images"
        guard = PromptGuard(self.log_prompts, route)
        try:
            guard.key = self._caller(request)
            req = guard.parse(await request.body(), ImageGenerationRequest)
            model = req.model
            self._check_model(model, image=True)
            job = image_job(req, self.max_images)
            out = await self._call(self.models[model].generate, job, deadline)
            self.engines[model] = "diffusers"
        except ApiError as e:
            return self._record(model, route, e, guard)
        except Exception as e:  # noqa: BLE001 - every failure leaves in OpenAI's shape
            return self._record(model, route, _failure(e, guard), guard)
        self._record_ok(model, route, guard)
        return images_response(out)

    def _check_model(self, model: str, image: bool) -> None:
        """404 for a model (or adapter) not served; 400 for a text model on the images route or
        back."""
        if model not in self.models and model not in self.adapters:
            available = sorted([*self.models, *self.adapters])
            raise _model_not_found(f"model {model!r} not found; available: {available}")
        if (model in self.image_models) != image:
            kind, route = ("an image", "/v1/images/generations") if not image else ("a text", "")
            route = route or "/v1/completions or /v1/chat/completions"
            raise ApiError(400, f"model {model!r} is {kind} model: use {route}", param="model")

    async def _handle(self, request: Request, model_cls, route: str):
        deadline = time.monotonic() + self.timeout
        model = ""
        guard = PromptGuard(self.log_prompts, route)
        try:
            guard.key = self._caller(request)
            req = guard.parse(await request.body(), model_cls)
            model = req.model
            self._check_model(model, image=False)
            job = to_job(req, self.limit)
            base = self.adapters.get(model)  # an adapter runs on its base model's replicas
            handle = self.models[base or model]
            if base is not None:  # preferably on one that holds it (ModelServer._submit)
                job.adapter = model
                handle = handle.options(multiplexed_model_id=model)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                writer = ChunkWriter(job.kind, model, include_usage)
                response = await self._open_stream(handle, job, writer, deadline, guard)
            else:
                out = await self._call(handle.complete, job, deadline)
                base = base or model
                self.engines[base] = out["engine"]
                self.versions[base] = out.get("version") or self.versions.get(base)
                body = response_body(job.kind, model, out)
                self._answered(model, guard, body)
                response = JSONResponse(body, headers=_replica_header(out.get("replica")))
        except ApiError as e:
            return self._record(model, route, e, guard)
        except Exception as e:  # noqa: BLE001 - every failure leaves in OpenAI's shape
            return self._record(model, route, _failure(e, guard), guard)
        self._record_ok(model, route, guard)
        return response

    def _caller(self, request: Request) -> str:
        """The fingerprint of the request's API key ("none" when the server has no keys); a 401
        when it presents none of ours."""
        key = request_key(request.headers.get("authorization"), self.keys)
        if self.keys and key is None:
            raise _auth_error()
        return key_fingerprint(key)

    def _record(
        self, model: str, route: str, err: ApiError, guard: PromptGuard | None = None
    ) -> JSONResponse:
        """Count a failed request (per key too, once its key was accepted); the error leaves
        without the request's texts."""
        self.route_metrics.record(model, route, err.status, err.type)
        if guard is None:
            return err.response()
        if guard.key is not None:
            self.usage.record(guard.key, model, err.status)
        return guard.clean(err).response()

    def _record_ok(self, model: str, route: str, guard: PromptGuard) -> None:
        self.route_metrics.record(model, route, 200)
        self.usage.record(guard.key, model, 200)

    def _answered(self, model: str, guard: PromptGuard, response: dict) -> None:
        """A whole response: its tokens per key; its texts logged only with log_prompts."""
        u = response["usage"]
        self.usage.add_tokens(guard.key, model, u["prompt_tokens"], u["completion_tokens"])
        choices = response["choices"]
        guard.answered([c["message"]["content"] if "message" in c else c["text"] for c in choices])

    async def _call(self, method, job, deadline: float) -> dict:
        """A model deployment's method (a handle's ``complete`` or ``generate``) within the
        deadline: past it the call is cancelled downstream; an error dict becomes an ApiError."""
        response = method.remote(job)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                out = await response
        except TimeoutError:
            response.cancel()
            raise
        if "error" in out:
            raise ApiError.from_dict(out["error"])
        return out

    async def _open_stream(
        self, handle, job: Job, writer: ChunkWriter, deadline: float, guard: PromptGuard
    ):
        """Wait for the model server's first event (so validation errors keep their status),
        then stream the rest as server-sent events."""
        events = handle.options(stream=True).stream.remote(job)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                first = await events.__anext__()
        except BaseException:
            events.cancel()
            raise
        if first.kind == "error":
            raise ApiError.from_dict(first.error)
        writer.fingerprint = first.version
        n = max(1, len(job.prompts)) * job.n
        sse = self._sse(events, writer, first.tokens, n, deadline, guard)
        return StreamingResponse(
            sse, media_type="text/event-stream", headers=_replica_header(first.replica)
        )

    async def _sse(
        self,
        events,
        writer: ChunkWriter,
        prompt_tokens: int,
        n: int,
        deadline: float,
        guard: PromptGuard,
    ):
        """Chunks until every choice finished; a disconnect cancels generation downstream.
        Tokens count for the key when the stream ends (however it ends)."""
        done_tokens, finished = 0, 0
        texts: dict[int, list[str]] = {}  # kept only for log_prompts
        try:
            yield writer.role(n)
            while True:
                # A timeout around each wait, not around the loop: it must not cancel
                # Starlette's send of a chunk we already yielded. (asyncio.timeout_at, not
                # wait_for: no task per chunk.)
                try:
                    async with asyncio.timeout_at(_loop_deadline(deadline)):
                        event = await events.__anext__()
                except StopAsyncIteration:
                    break
                if event.kind == "delta":
                    if guard.log_prompts:
                        texts.setdefault(event.index, []).append(event.text)
                    yield writer.delta(event.index, event.text)
                elif event.kind == "finish":
                    done_tokens += event.tokens
                    finished += 1
                    last = usage(prompt_tokens, done_tokens) if finished == n else None
                    yield writer.finish(event.index, event.finish_reason, last)
                else:
                    raise ApiError.from_dict(event.error)
            yield writer.end(usage(prompt_tokens, done_tokens))
        except Exception as e:  # noqa: BLE001 - mid-stream failures become an error event
            yield writer.error(guard.clean(_failure(e, guard)))
        finally:
            events.cancel()
            self.usage.add_tokens(guard.key, writer.model, prompt_tokens, done_tokens)
            guard.answered(["".join(texts[i]) for i in sorted(texts)])


# On the head, beside Serve's controller and proxy: a node the autoscaler removes when it is
# idle (no CPU or GPU in use) must never be the one holding the 0-CPU router.
@serve.deployment(
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
)
@serve.ingress(api)
class Router(OpenAISurface):
    """The OpenAI HTTP API in front of one ModelServer (or ImageServer) deployment per model."""

    def __init__(
        self,
        models: dict,
        max_tokens_limit: int,
        request_timeout_s: float,
        image_models: list[str] | None = None,
        max_images: int = 10,
        log_prompts: bool = False,
        adapters: dict[str, str] | None = None,
    ):
        self._init_surface(
            models,
            max_tokens_limit,
            request_timeout_s,
            image_models,
            max_images,
            log_prompts,
            adapters,
        )

    def reconfigure(self, config: dict) -> None:
        """Serve's user_config: the deployed models' versions (a rollout updates them here, in
        place, without restarting the ingress)."""
        self.versions.update(config.get("versions") or {})

    @api.get("/health")
    async def health(self) -> dict:
        return self._health()

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        return self._list_models(request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, CompletionRequest, "completions")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, ChatCompletionRequest, "chat")

    @api.post("/v1/images/generations")
    async def image_generations(self, request: Request):
        return await self._images(request)


def ingress_capacity(m: ServedModel) -> int | None:
    """Engine requests a ModelIngress replica takes before it answers 503: the requests it
    runs plus those it queues (max_ongoing_requests + max_queued_requests), or None (no
    limit) when the queue has none."""
    if m.max_queued_requests < 0:
        return None
    return m.max_ongoing_requests + m.max_queued_requests


class _LocalCall:
    """A LocalHandle call: awaitable like a DeploymentResponse, cancellable like one."""

    def __init__(self, coro):
        self._task = asyncio.ensure_future(coro)

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


class _LocalStream:
    """A LocalHandle stream: iterated like a DeploymentResponseGenerator; cancel() closes the
    model server's generator, whose ``finally`` cancels its engine requests."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self) -> None:
        if self._agen.ag_running:  # cancelled mid-step: the exception already closes it
            return
        asyncio.ensure_future(self._agen.aclose())


class _LocalMethod:
    def __init__(self, call):
        self.remote = call


class LocalHandle:
    """What OpenAISurface calls on a model server, for the server in this very replica: the
    calls of a DeploymentHandle (``complete.remote``, ``options(stream=True).stream.remote``)
    made in-process, without Ray in between."""

    def __init__(self, server: "ModelServer"):
        self._server = server

    def options(self, **_) -> "LocalHandle":
        return self

    @property
    def complete(self) -> _LocalMethod:
        return _LocalMethod(lambda job: _LocalCall(self._server.complete(job)))

    @property
    def stream(self) -> _LocalMethod:
        return _LocalMethod(lambda job: _LocalStream(self._server.stream(job)))


@serve.deployment(health_check_period_s=5)
@serve.ingress(direct_api)
class ModelIngress(ModelServer.func_or_class, OpenAISurface):
    """One text model whose replicas take HTTP themselves (serve.ingress: direct): the OpenAI
    surface and the engine in one replica. Behind HAProxy (Serve's direct ingress) no Python hop
    is left between the client and the engine; behind Serve's proxy, one fewer than through the
    Router. Deployed as ``model-<name>`` with that model's replicas, resources and autoscaling."""

    DEFAULT_CHUNKS_PER_S = 0.0  # one chunk per token (bench_serve: 35 ms chunk gap at c=32)

    def __init__(
        self, model: dict, max_tokens_limit: int, request_timeout_s: float, log_prompts: bool
    ):
        super().__init__(model)
        self.capacity = ingress_capacity(self.cfg)
        self._init_surface(
            {self.name: LocalHandle(self)},
            max_tokens_limit,
            request_timeout_s,
            log_prompts=log_prompts,
            adapters=dict.fromkeys(self.cfg.adapters, self.name),
        )
        self.engines[self.name] = self.choice.name
        self.versions[self.name] = self.version

    async def _submit(self, job: Job, stream: bool):
        """Serve's own rejection past max_queued_requests is a plain-text 503 here (direct
        ingress answers before our code): the replica admits that many more itself and
        answers beyond them in OpenAI's shape."""
        if self.capacity is not None and self.open >= self.capacity:
            raise _overloaded()
        return await super()._submit(job, stream)

    @direct_api.get("/health")
    async def health(self) -> dict:
        return self._health()

    @direct_api.get("/v1/models")
    async def list_models(self, request: Request):
        return self._list_models(request)

    @direct_api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, CompletionRequest, "completions")

    @direct_api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, ChatCompletionRequest, "chat")

    @direct_api.post("/v1/images/generations")
    async def image_generations(self, request: Request):
        return await self._images(request)
