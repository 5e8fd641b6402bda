"""The OpenAI protocol, without Ray: request models, validation into engine jobs, error bodies,
and response / stream-chunk builders for /v1/completions and /v1/chat/completions.

Every problem becomes an ``ApiError`` that renders as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""

# No `from __future__ import annotations`: pydantic resolves these annotations at runtime.
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aigc_ray.engine import SamplingParams

# ChatML, used when a tokenizer has no chat template of its own (ours do not). Documented in the
# README; "<|im_end|>" is added to the stop strings so a turn ends where the template says.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CHAT_STOP = "<|im_end|>"


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def to_dict(self) -> dict:
        """The error body's fields plus the status: how a model server hands an error back."""
        return {**self.body()["error"], "status": self.status}

    @classmethod
    def from_dict(cls, d: dict) -> "ApiError":
        return cls(d["status"], d["message"], d["type"], d["param"], d["code"])

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request models


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Served model name.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off (an extension, as in vLLM).")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt.")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Generate past EOS (benchmarks; vLLM's name).")
    logprobs: Any = None
    echo: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(description="Prompt text (or a list with one prompt).")
    max_tokens: int = Field(16, description="Tokens to generate.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, description="Tokens to generate (default: the limit).")
    max_completion_tokens: int | None = Field(None, description="Newer name of max_tokens.")


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", []) if p != "body"]
    msg = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
    return ApiError(400, msg, param=loc[0] if loc else None)


def parse_json(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """Validate a JSON body into ``model``; any problem raises a 400 ApiError."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


# ---------------------------------------------------------------- jobs for the model servers


@dataclass
class Job:
    """What a model server needs for one request: prompt (text or chat messages), params, n."""

    kind: Literal["completion", "chat"]
    prompt: str | None = None
    messages: list[dict] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = True  # chat: False means "as many as fit" (resolved per model)
    n: int = 1


def to_job(req: CompletionRequest | ChatCompletionRequest, limit: int) -> Job:
    """Check what the engine cannot (types, n, unsupported options, max_tokens range)."""
    if req.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    if req.echo:
        raise ApiError(400, "echo is not supported by this server", param="echo")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise ApiError(400, f"stop may hold at most 4 strings, got {len(stop)}", param="stop")
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        given = max_tokens is not None
        max_tokens = max_tokens if given else limit
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        job = Job("chat", messages=messages, max_tokens_given=given)
    else:
        max_tokens = req.max_tokens
        job = Job("completion", prompt=_single_prompt(req.prompt))
    if not 1 <= max_tokens <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit}, got {max_tokens}",
                       param="max_tokens")  # fmt: skip
    job.params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                                top_p=req.top_p, top_k=req.top_k, stop=stop, seed=req.seed,
                                ignore_eos=req.ignore_eos)  # fmt: skip
    job.n = req.n
    return job


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt must be a string or a list with exactly one string",
                           param="prompt")  # fmt: skip
        return prompt[0]
    return prompt


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """Prompt text for ``messages`` (the tokenizer's chat template, else ChatML) and the extra
    stop strings that template implies."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, []
    text = tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
    return text, [DEFAULT_CHAT_STOP]


# ---------------------------------------------------------------- responses and chunks


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def response_body(kind: str, model: str, out: dict) -> dict:
    """A full (non-streamed) completion / chat.completion from a model server's output
    ``{"prompt_tokens", "choices": [{"text", "finish_reason", "completion_tokens"}]}``."""
    choices = []
    for i, c in enumerate(out["choices"]):
        if kind == "chat":
            message = {"role": "assistant", "content": c["text"]}
            choices.append({"index": i, "message": message, "finish_reason": c["finish_reason"]})
        else:
            choices.append({"index": i, "text": c["text"], "logprobs": None,
                            "finish_reason": c["finish_reason"]})  # fmt: skip
    completion_tokens = sum(c["completion_tokens"] for c in out["choices"])
    return {"id": new_id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(out["prompt_tokens"], completion_tokens)}  # fmt: skip


class ChunkWriter:
    """Server-sent-event lines of one streamed response, in OpenAI's chunk format."""

    def __init__(self, kind: str, model: str, include_usage: bool):
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id, self.created = new_id(kind), int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _line(self, choices: list[dict], **extra) -> str:
        chunk = {"id": self.id, "object": self.object, "created": self.created,
                 "model": self.model, "choices": choices, **extra}  # fmt: skip
        return f"data: {json.dumps(chunk)}\n\n"

    def _choice(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None,
                "finish_reason": finish_reason}  # fmt: skip

    def role(self, n: int) -> str:
        """Chat streams open with the assistant role, one choice each."""
        if self.kind != "chat":
            return ""
        return "".join(self._line([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]) for i in range(n))  # fmt: skip

    def delta(self, index: int, text: str) -> str:
        return self._line([self._choice(index, text, None)])

    def finish(self, index: int, finish_reason: str, last_usage: dict | None) -> str:
        """A choice's last chunk; the last one to finish carries usage unless it gets its own
        chunk (``stream_options.include_usage``, OpenAI's format)."""
        extra = {"usage": last_usage} if last_usage and not self.include_usage else {}
        return self._line([self._choice(index, None, finish_reason)], **extra)

    def end(self, total_usage: dict) -> str:
        tail = self._line([], usage=total_usage) if self.include_usage else ""
        return tail + "data: [DONE]\n\n"

    def error(self, err: ApiError) -> str:
        return f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"
