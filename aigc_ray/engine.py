"""Text-generation engine shared by the Serve deployment and offline batch generation.

Pure torch + transformers (never imports ray): a static-batch decode loop of our own over the
model's KV cache. Prompts are left-padded into one batch, prefilled once, then decoded one token
per step for every row; each row has its own sampling parameters, seed and stop conditions.

Cancellation: ``stream`` is a generator, so closing it (client disconnect) stops decoding at the
next token. ``generate`` runs a chunk to completion.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SamplingParams:
    """Per-request decoding parameters (OpenAI-like semantics).

    ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``stop`` strings end generation; the returned text is cut before the first stop string.
    ``seed`` gives the request its own ``torch.Generator`` so sampling is reproducible.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationResult:
    """One completion. ``token_ids`` include a final EOS token if one was generated (text never
    does); ``finish_reason`` is ``"stop"`` (EOS or stop string) or ``"length"`` (max_tokens)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


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


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on cuda if supported (else float16), float32 elsewhere."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus (top-p) sets.

    ``logits`` is [rows, vocab] (already temperature-scaled); ``top_k`` [rows] int (0 = off),
    ``top_p`` [rows] float (1 = off). The most likely token of each row is always kept.
    """
    needs_k = top_k > 0
    needs_p = top_p < 1
    if not bool(needs_k.any() or needs_p.any()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    remove = needs_k[:, None] & (ranks[None, :] >= top_k[:, None])
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= needs_p[:, None] & (mass_before >= top_p[:, None])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class Sampler:
    """Chooses the next token of every row, each with its own params and generator."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device):
        self.greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        self.temperature = torch.tensor(temps, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.generators = [_make_generator(p.seed, device) for p in params]
        self.sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return next token ids [rows] (long) for ``logits`` [rows, vocab]."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        if not self.sampled_rows:
            return tokens
        rows = torch.tensor(self.sampled_rows, device=logits.device)
        scaled = logits[rows] / self.temperature[rows, None]
        probs = filter_logits(scaled, self.top_k[rows], self.top_p[rows]).softmax(dim=-1)
        # One multinomial per row so each request draws only from its own generator: a seeded
        # request's random stream does not depend on its batch neighbours.
        for j, i in enumerate(self.sampled_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=self.generators[i])[0]
        return tokens


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class RowState:
    """Output of one request in a batch: generated ids, stop checks, finish reason."""

    def __init__(self, prompt_tokens: int, params: SamplingParams, tokenizer, eos_ids: set[int]):
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._text: str = ""
        self._text_len = 0  # number of token ids self._text was decoded from
        self._text_frozen = False  # set once a stop string cut the text
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Decoded completion (special tokens skipped), cut before a stop string if one hit."""
        if self._text_len != len(self.token_ids) and not self._text_frozen:
            self._text = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
            self._text_len = len(self.token_ids)
        return self._text

    def push(self, token_id: int) -> None:
        """Append one generated token (ignored once finished) and update the finish reason."""
        if self.finished:
            return
        # Only text decoded since the last check (plus a stop-length overlap) can hold a new hit.
        # Trailing U+FFFD (partial UTF-8) may still change when the next byte arrives.
        search_from = max(0, len(self._text.rstrip("\ufffd")) - self._max_stop + 1)
        self.token_ids.append(token_id)
        hit_eos = token_id in self._eos_ids
        if hit_eos or (self.params.stop and self._hit_stop(search_from)):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def _hit_stop(self, search_from: int) -> bool:
        text = self.text
        hits = [i for s in self.params.stop if (i := text.find(s, search_from)) >= 0]
        if not hits:
            return False
        self._text = text[: min(hits)]
        self._text_frozen = True
        return True

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            finish_reason=self.finish_reason or "length",
        )


def stable_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of an unfinished completion that is safe to stream: drops a trailing partial
    UTF-8 character and holds back any suffix that could still grow into a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]


class GenerationEngine:
    """Batched text generation over a causal LM and its tokenizer.

    Each call owns its KV cache and sampler state, so calls from several threads do not mix
    outputs, but they do not batch together either: callers that want throughput (the Serve
    deployment, batch generation) gather requests into one ``generate`` call.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_token_ids(model, tokenizer)
        self.pad_id = _pad_token_id(tokenizer, self.eos_ids)
        self.context_window = _context_window(model, tokenizer)
        forward_params = inspect.signature(model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in forward_params
        # transformers >= 5.2x renamed past_key_values -> cache (old name warns); support both.
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"

    @classmethod
    def from_pretrained(
        cls, model_dir: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 32
    ) -> GenerationEngine:
        """Load a HF model dir (model + tokenizer) onto ``device`` in ``dtype``, in eval mode."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        model.to(torch_device).eval()
        logger.info("loaded %s on %s as %s", model_dir, torch_device, torch_dtype)
        return cls(model, tokenizer, max_batch_size=max_batch_size)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` with the tokenizer's default special tokens (e.g. BOS)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def count_tokens(self, prompt: str) -> int:
        """Number of prompt tokens the model will see for ``prompt``."""
        return len(self.encode(prompt))

    def check_request(self, prompt: str, params: SamplingParams) -> int:
        """Validate one request; return its prompt token count.

        Raises InvalidParamError for bad params or an empty prompt, ContextLengthError when
        prompt tokens + max_tokens exceed ``context_window``.
        """
        return self._check(self.encode(prompt), params)

    def _check(self, ids: list[int], params: SamplingParams) -> int:
        validate_params(params)
        if not ids:
            raise InvalidParamError("prompt must contain at least one token", "prompt")
        if len(ids) + params.max_tokens > self.context_window:
            raise ContextLengthError(len(ids), params.max_tokens, self.context_window)
        return len(ids)

    def generate(
        self, prompts: Sequence[str], params: Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Complete every prompt with its own params; results are in input order.

        All requests are validated first (raising as ``check_request`` does, before any
        decoding), then decoded in chunks of ``max_batch_size`` with one batched loop each.
        """
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} params")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, params, strict=True):
            self._check(ids, p)
        results: list[GenerationResult] = []
        for start in range(0, len(encoded), self.max_batch_size):
            end = start + self.max_batch_size
            rows = self._new_rows(encoded[start:end], params[start:end])
            for _ in self._decode(encoded[start:end], rows):
                pass
            results.extend(row.result() for row in rows)
        return results

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Yield text deltas of one completion as they become final (for SSE).

        Joined, the deltas equal the ``text`` that ``generate`` would return. The generator's
        return value (``StopIteration.value``, i.e. ``result = yield from engine.stream(...)``) is
        the GenerationResult with usage and finish_reason. Closing the generator cancels decoding.
        """
        ids = self.encode(prompt)
        self._check(ids, params)
        rows = self._new_rows([ids], [params])
        row, emitted = rows[0], 0
        for _ in self._decode([ids], rows):
            text = row.text if row.finished else stable_prefix(row.text, params.stop)
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        return row.result()

    def _new_rows(self, encoded, params) -> list[RowState]:
        return [
            RowState(len(ids), p, self.tokenizer, self.eos_ids)
            for ids, p in zip(encoded, params, strict=True)
        ]

    @torch.inference_mode()
    def _decode(self, encoded: list[list[int]], rows: list[RowState]) -> Iterator[None]:
        """Batched decode loop: prefill the left-padded batch, then one token per step for every
        row until all rows finish. Yields after each step (rows updated in place)."""
        started = time.perf_counter()
        sampler = Sampler([r.params for r in rows], self.device)
        input_ids, mask, positions = self._left_pad(encoded)
        logits, past = self._forward(input_ids, mask, positions, past=None)
        last_pos = positions[:, -1:]
        steps = 0
        while True:
            tokens = sampler(logits)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                row.push(token)
            steps += 1
            yield
            if all(row.finished for row in rows):
                break
            finished = torch.tensor([r.finished for r in rows], device=self.device)
            feed = tokens.masked_fill(finished, self.pad_id)[:, None]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            last_pos = last_pos + 1
            logits, past = self._forward(feed, mask, last_pos, past)
        self._log_batch(rows, steps, time.perf_counter() - started)

    def _left_pad(self, encoded: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """Left-pad token lists into (input_ids, attention_mask, position_ids) tensors."""
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _forward(self, input_ids, mask, positions, past):
        """One model call; returns (last-position logits [rows, vocab], updated KV cache)."""
        extra = {self._cache_name: past}
        if self._keep_last_logits:
            extra["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :], getattr(out, self._cache_name)

    def _log_batch(self, rows: list[RowState], steps: int, seconds: float) -> None:
        new_tokens = sum(len(r.token_ids) for r in rows)
        logger.debug(
            "batch of %d: %d steps, %d new tokens in %.2fs (%.1f tok/s)",
            len(rows),
            steps,
            new_tokens,
            seconds,
            new_tokens / max(seconds, 1e-9),
        )


def _eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids: the tokenizer's plus the model generation_config's (as model.generate uses)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return ids


def _pad_token_id(tokenizer, eos_ids: set[int]) -> int:
    """The tokenizer's pad id, else its EOS id (pad positions are masked, so any id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return min(eos_ids, default=0)


def _context_window(model, tokenizer) -> int:
    """Max sequence length: config.max_position_embeddings (or n_positions), else tokenizer's."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    return int(tokenizer.model_max_length)
