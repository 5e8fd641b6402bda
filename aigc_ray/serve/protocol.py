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
from typing import Literal, NamedTuple

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aigc_ray.engine import SamplingParams
from aigc_ray.engine.params import MAX_LOGPROBS

# ChatML, used when a tokenizer has no chat template of its own (ours do not). Documented in the
# README; "<|im_end|>" is added to the stop strings so a turn ends where the template says.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CHAT_STOP = "<|im_end|>"


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

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


MAX_PROMPTS = 256  # prompts in one /v1/completions request (each with n choices)
MAX_CHOICES = 512  # prompts x n


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


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, or token ids (one list or a list of lists)."
    )
    max_tokens: int = Field(16, description="Tokens to generate (0 only with echo: score).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Top-N log-probabilities per token."
    )
    echo: bool = Field(False, description="Return the prompt (and its logprobs) before the text.")


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
    logprobs: bool = Field(False, description="Log-probability of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (needs logprobs)."
    )


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
    """What a model server needs for one request: prompts (text or token ids) or chat messages,
    params, n choices per prompt, and how to report logprobs."""

    kind: Literal["completion", "chat"]
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = True  # chat: False means "as many as fit" (resolved per model)
    n: int = 1
    echo: bool = False
    score_only: bool = False  # echo with max_tokens 0: the prompt's logprobs, nothing generated
    adapter: str | None = None  # the LoRA adapter the request named as its model, if any


def to_job(req: CompletionRequest | ChatCompletionRequest, limit: int) -> Job:
    """Check what the engine cannot (types, n, prompt counts, max_tokens range)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise ApiError(400, f"stop may hold at most 4 strings, got {len(stop)}", param="stop")
    logprobs = None
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        given = max_tokens is not None
        max_tokens = max_tokens if given else limit
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        job = Job("chat", messages=messages, max_tokens_given=given)
        if req.logprobs:
            logprobs = req.top_logprobs or 0
        elif req.top_logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        max_tokens = req.max_tokens
        job = Job("completion", prompts=_prompts(req.prompt), echo=req.echo)
        logprobs = req.logprobs
        if max_tokens == 0 and req.echo:
            job.score_only, max_tokens = True, 1
    if len(job.prompts) * req.n > MAX_CHOICES:
        raise ApiError(
            400,
            f"prompts x n may be at most {MAX_CHOICES}, got {len(job.prompts) * req.n}",
            param="n",
        )
    if not 1 <= max_tokens <= limit:
        message = f"max_tokens must be between 1 and {limit} (0 with echo), got {max_tokens}"
        raise ApiError(400, message, param="max_tokens")
    prompt_logprobs = logprobs if job.echo and logprobs is not None else None
    job.params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=stop,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    job.n = req.n
    return job


def _prompts(prompt) -> list[str | list[int]]:
    """The request's prompts: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    prompts = [prompt] if isinstance(prompt[0], int) else list(prompt)
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(
            400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt"
        )
    if any(isinstance(p, list) and not p for p in prompts):
        raise ApiError(400, "a token-id prompt must not be empty", param="prompt")
    return prompts


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """Prompt text for ``messages`` (the tokenizer's chat template, else ChatML) and the extra
    stop strings that template implies."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, []
    text = tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    return text, [DEFAULT_CHAT_STOP]


# ---------------------------------------------------------------- logprobs


def completion_logprobs(tokenizer, token_ids: list[int], entries: list, start: int = 0) -> dict:
    """OpenAI's legacy completions ``logprobs`` object for ``token_ids`` and their entries
    (TokenLogprob or None): tokens, token_logprobs, top_logprobs and text_offset from ``start``.
    """
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start
    for token_id, entry in zip(token_ids, entries, strict=True):
        piece = tokenizer.decode([token_id])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry.logprob)
        top = {tokenizer.decode([t]): lp for t, lp in entry.top}
        top.setdefault(piece, entry.logprob)  # as OpenAI: the chosen token is always listed
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, token_ids: list[int], entries: list) -> dict:
    """OpenAI's chat ``logprobs`` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(token_id: int, lp: float) -> dict:
        piece = tokenizer.decode([token_id])
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        content.append(
            {**item(token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
        )
    return {"content": content}


# ---------------------------------------------------------------- model server -> router


class StreamEvent(NamedTuple):
    """What a model server streams to the router for one request: ``start`` (prompt tokens),
    then ``delta`` (text of choice ``index``) and ``finish`` (its reason and token count), or
    ``error`` (an ApiError as a dict) instead."""

    kind: Literal["start", "delta", "finish", "error"]
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0  # start: prompt tokens; finish: the choice's completion tokens
    error: dict | None = None
    version: str | None = None  # start: the model version answering (system_fingerprint)
    replica: str | None = None  # start: the replica answering (the x-aigc-replica header)


# ---------------------------------------------------------------- responses and chunks


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(kind: str, model: str, out: dict) -> dict:
    """A full (non-streamed) completion / chat.completion from a model server's output
    ``{"prompt_tokens", "choices": [{"text", "finish_reason", "completion_tokens", "logprobs"}]}``
    (choices in order: prompt by prompt, n each)."""
    choices = []
    for i, c in enumerate(out["choices"]):
        common = {"index": i, "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
        if kind == "chat":
            choices.append({**common, "message": {"role": "assistant", "content": c["text"]}})
        else:
            choices.append({**common, "text": c["text"]})
    completion_tokens = sum(c["completion_tokens"] for c in out["choices"])
    return {
        "id": new_id(kind),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(out["prompt_tokens"], completion_tokens),
        "system_fingerprint": out.get("version"),
    }


class ChunkWriter:
    """Server-sent-event lines of one streamed response, in OpenAI's chunk format."""

    def __init__(self, kind: str, model: str, include_usage: bool):
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id, self.created = new_id(kind), int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.fingerprint: str | None = None  # the model version, once the stream started

    def _line(self, choices: list[dict], **extra) -> str:
        chunk = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    def _choice(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish_reason}
        return {
            "index": index,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def role(self, n: int) -> str:
        """Chat streams open with the assistant role, one choice each."""
        if self.kind != "chat":
            return ""
        return "".join(
            self._line(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            for i in range(n)
        )

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
