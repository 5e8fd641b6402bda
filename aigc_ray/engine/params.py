"""Request-level types of the engine: sampling parameters, results, validation errors, devices."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from aigc_ray.errors import AigcRayError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SamplingParams:
    """Per-request decoding parameters (OpenAI-like semantics).

    ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``stop`` strings end generation; the returned text is cut before the first stop string.
    ``seed`` gives the request its own ``torch.Generator`` so sampling is reproducible.
    ``ignore_eos`` keeps generating past EOS (benchmarks with fixed output lengths, as in vLLM).
    ``logprobs`` (0..MAX_LOGPROBS) returns each generated token's log-probability and that many
    most likely alternatives; ``prompt_logprobs`` does the same for every prompt token after the
    first (loglikelihood evaluation). Log-probabilities are of the model's raw distribution
    (before temperature and top-k/top-p), as vLLM reports them by default.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None


MAX_LOGPROBS = 20  # as vLLM's default max_logprobs and OpenAI's top_logprobs limit


@dataclass
class TokenLogprob:
    """One position: the token there, its log-probability, and the ``top`` alternatives
    (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One completion. ``token_ids`` include a final EOS token if one was generated (text never
    does); ``finish_reason`` is ``"stop"`` (EOS or stop string), ``"length"`` (max_tokens) or
    ``"cancelled"`` (the caller cancelled the request). ``logprobs`` has one entry per token
    id, ``prompt_logprobs`` one per prompt token (None for the first), when asked for."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class InvalidParamError(ValueError):
    """A sampling parameter or prompt is invalid; ``param`` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParamError):
    """prompt_tokens + max_tokens exceeds the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_window: int):
        super().__init__(
            f"This model's maximum context length is {context_window} tokens, but "
            f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the prompt + "
            f"{max_tokens} max_tokens). Shorten the prompt or reduce max_tokens.",
            param="max_tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window


class EngineError(RuntimeError):
    """The engine failed while decoding a request (the request is lost, the engine keeps going)."""


class EngineDeadError(EngineError):
    """The engine itself is gone (e.g. vLLM's engine process died): nothing more will run here,
    the replica must be replaced."""


class EngineUnavailableError(AigcRayError, RuntimeError):
    """The requested engine cannot serve this model here (not installed, unsupported model, or
    its load failed); the message names the model and the reason."""


def new_counters(**extra) -> dict:
    """The counters every engine's ``stats()`` reports (the serve metrics read them), plus its
    own ``extra`` ones, all at zero."""
    base = ("finished", "cancelled", "failed", "prompt_tokens", "generated_tokens", "steps")
    return {**dict.fromkeys(base, 0), **extra}


def validate_params(params: SamplingParams) -> None:
    """Raise InvalidParamError naming the first out-of-range field of ``params``."""
    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise InvalidParamError(f"max_tokens must be >= 1, got {params.max_tokens}", "max_tokens")
    if params.temperature < 0:
        raise InvalidParamError(
            f"temperature must be >= 0, got {params.temperature}", "temperature"
        )
    if not 0 < params.top_p <= 1:
        raise InvalidParamError(f"top_p must be in (0, 1], got {params.top_p}", "top_p")
    if params.top_k < 0:
        raise InvalidParamError(f"top_k must be >= 0, got {params.top_k}", "top_k")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise InvalidParamError("stop must be a list of non-empty strings", "stop")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            message = f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}"
            raise InvalidParamError(message, name)


FAKE_CLUSTER_ENV = "RAY_FAKE_CLUSTER"  # set on every node of `aigc-ray cluster local`
_log = logging.getLogger(__name__)


class GpuUnavailableError(AigcRayError, RuntimeError):
    """Ray reserved a GPU for this worker, replica or actor, but torch cannot use it."""


def usable_device(device: str, where: str) -> str:
    """`device` as it can be used here. A cuda device torch cannot see is an error that names
    the cause (a node that advertises a GPU without a driver or a CUDA build of torch), except
    on the fake nodes of `aigc-ray cluster local` (RAY_FAKE_CLUSTER=1), whose GPUs are resource
    counts only: there, and only there, the work runs on CPU, with a warning."""
    if not str(device).startswith("cuda") or torch.cuda.is_available():
        return device
    if os.environ.get(FAKE_CLUSTER_ENV) == "1":
        _log.warning(
            "%s: fake GPU node (RAY_FAKE_CLUSTER=1): the GPU Ray reserved has no CUDA device; "
            "computing on CPU",
            where,
        )
        return "cpu"
    raise GpuUnavailableError(
        f"{where}: Ray reserved a GPU (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) but torch {torch.__version__} sees "
        f"none (torch.cuda.is_available() is False): this node advertises a GPU that it cannot "
        f"use. Check the NVIDIA driver (nvidia-smi) and that torch is a CUDA build on it, or "
        f"ask for no GPU (num_gpus: 0 / train.use_gpu: false)"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, saved: str | None = None) -> torch.dtype:
    """``"auto"``: the model directory's own dtype (``saved``) when it is a half type (an
    optimized bf16/fp16 model stays one), else bfloat16 on cuda if supported (else float16),
    float32 elsewhere."""
    if dtype == "auto":
        if saved in ("bfloat16", "float16"):
            return _DTYPES[saved]
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
