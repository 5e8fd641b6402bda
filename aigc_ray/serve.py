"""Serving stage: a Ray Serve deployment with a FastAPI ingress speaking the OpenAI API.

`build_app(args)` is the typed app builder used by `serve run/deploy aigc_ray.serve:build_app`
and by `aigc-ray serve`. Requests are validated one by one (so a bad request never fails its
batch neighbours), then gathered by `@serve.batch` into one batched decode of the engine.
Errors always use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations at runtime.
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_ray.config import ServeConfig
from aigc_ray.engine import GenerationEngine, GenerationResult, InvalidParamError, SamplingParams

log = logging.getLogger(__name__)

API_KEYS_ENV = "AIGC_RAY_API_KEYS"
API_KEYS_FILE_ENV = "AIGC_RAY_API_KEYS_FILE"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServeError(ValueError):
    """A serving-stage configuration problem found before deploying."""


# ---------------------------------------------------------------- API keys


def load_api_keys() -> list[str]:
    """API keys from $AIGC_RAY_API_KEYS (comma-separated) and/or the file $AIGC_RAY_API_KEYS_FILE."""
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


# ---------------------------------------------------------------- request models and errors


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Served model name.")
    prompt: str | list[str] = Field(description="Prompt text (or a list with one prompt).")
    max_tokens: int = Field(16, description="Tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")
    stop: str | list[str] | None = Field(None, description="Stop strings.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    n: int = Field(1, ge=1, le=1, description="Completions per prompt (1 for now).")
    stream: bool = Field(False, description="Server-sent events.")


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _validation_error(exc: RequestValidationError | ValidationError) -> JSONResponse:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", []) if p != "body"]
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        return error_response(400, "request body is not valid JSON", "invalid_request_error")
    msg = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
    return error_response(400, msg, "invalid_request_error", param)


def _http_error(exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), type_)


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """Parse and validate a JSON body; any problem becomes a 400 in OpenAI's error shape."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "request body is not valid JSON", "invalid_request_error")
    if not isinstance(data, dict):
        return error_response(400, "request body must be a JSON object", "invalid_request_error")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        return _validation_error(e)


def _sampling(req: CompletionRequest, limit: int) -> SamplingParams:
    if req.max_tokens < 1 or req.max_tokens > limit:
        raise InvalidParamError(f"max_tokens must be between 1 and {limit}, got {req.max_tokens}",
                                "max_tokens")  # fmt: skip
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, stop=stop, seed=req.seed)  # fmt: skip


def _prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise InvalidParamError("prompt must be a string or a list with exactly one string",
                                    "prompt")  # fmt: skip
        return req.prompt[0]
    return req.prompt


def completion_body(result: GenerationResult, model: str) -> dict:
    """An OpenAI `text_completion` object for one result."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],  # fmt: skip
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },  # fmt: skip
    }


# ---------------------------------------------------------------- the deployment

api = FastAPI(title="aigc_ray OpenAI-compatible API")
api.add_exception_handler(RequestValidationError, lambda r, e: _validation_error(e))
api.add_exception_handler(StarletteHTTPException, lambda r, e: _http_error(e))


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class OpenAIServer:
    """One model behind /v1/completions and /v1/models; batches concurrent requests."""

    def __init__(self, model_dir: str, model_name: str, max_tokens_limit: int, max_batch_size: int,
                 batch_wait_timeout_s: float):  # fmt: skip
        self.engine = GenerationEngine.from_pretrained(model_dir, max_batch_size=max_batch_size)
        self.model_name, self.limit = model_name, max_tokens_limit
        self.keys = load_api_keys()
        self.created = int(time.time())
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def generate_batch(
        self, items: list[tuple[str, SamplingParams]]
    ) -> list[GenerationResult]:
        prompts, params = zip(*items, strict=True)
        return await asyncio.to_thread(self.engine.generate, list(prompts), list(params))

    def _auth_error(self, request: Request) -> JSONResponse | None:
        if key_allowed(request.headers.get("authorization"), self.keys):
            return None
        return error_response(401, "missing or invalid API key (Authorization: Bearer <key>)",
                              "authentication_error", code="invalid_api_key")  # fmt: skip

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        if err := self._auth_error(request):
            return err
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "aigc_ray",
        }
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        if err := self._auth_error(request):
            return err
        req = await parse_body(request, CompletionRequest)
        if isinstance(req, JSONResponse):
            return req
        if req.model != self.model_name:
            return error_response(404, f"model {req.model!r} not found; available: {self.model_name}",
                                  "not_found_error", "model", "model_not_found")  # fmt: skip
        try:
            prompt, params = _prompt(req), _sampling(req, self.limit)
            self.engine.check_request(prompt, params)
        except InvalidParamError as e:
            code = "context_length_exceeded" if "context length" in str(e) else None
            return error_response(400, str(e), "invalid_request_error", e.param, code)
        if req.stream:
            return StreamingResponse(self._sse(prompt, params), media_type="text/event-stream")
        result = await self.generate_batch((prompt, params))
        return completion_body(result, self.model_name)

    async def _sse(self, prompt: str, params: SamplingParams):
        """Server-sent events in OpenAI's chunk format; a client disconnect closes the generator."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = False

        def worker() -> None:
            gen = self.engine.stream(prompt, params)
            try:
                while not stop:
                    loop.call_soon_threadsafe(queue.put_nowait, ("delta", next(gen)))
            except StopIteration as done:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", done.value))
            finally:
                gen.close()

        task = loop.run_in_executor(None, worker)
        cid = f"cmpl-{uuid.uuid4().hex}"
        try:
            while True:
                kind, value = await queue.get()
                if kind == "done":
                    chunk = completion_body(value, self.model_name)
                    chunk["choices"][0]["text"] = ""
                    yield f"data: {json.dumps({**chunk, 'id': cid})}\n\n"
                    break
                chunk = {"id": cid, "object": "text_completion", "created": int(time.time()),
                         "model": self.model_name, "choices": [{"index": 0, "text": value,
                         "logprobs": None, "finish_reason": None}]}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            stop = True
            await task


# ---------------------------------------------------------------- app builder and runner


def check_bind(host: str, keys: list[str]) -> None:
    """Refuse to publish the API beyond loopback without API keys."""
    if host not in LOOPBACK and not keys:
        raise ServeError(f"serve.host is {host}, which is not loopback: set {API_KEYS_ENV} or "
                         f"{API_KEYS_FILE_ENV} before exposing the API")  # fmt: skip


def build_app(args: dict[str, Any]) -> serve.Application:
    """Typed app builder: `args` are ServeConfig fields (model_dir required)."""
    from aigc_ray.model import check_model_dir

    cfg = ServeConfig(**args)
    if not cfg.model_dir:
        raise ServeError("serve.model_dir is required to build the app")
    check_model_dir(cfg.model_dir)
    options = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    deployment = OpenAIServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options=options,
    )
    return deployment.bind(str(Path(cfg.model_dir).resolve()), cfg.model_name, cfg.max_tokens_limit,
                           cfg.max_batch_size, cfg.batch_wait_timeout_s)  # fmt: skip


def run_serve(cfg: ServeConfig, model_dir: str, app_name: str = "aigc") -> str:
    """Deploy on the connected Ray cluster; return the base URL. Returns once replicas are ready."""
    check_bind(cfg.host, load_api_keys())
    app = build_app({**cfg.model_dump(), "model_dir": model_dir})
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=app_name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"
