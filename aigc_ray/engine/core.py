"""GenerationEngine: continuous batching over one model, in a scheduler thread of its own.

``submit`` validates a request and queues it; the scheduler thread admits waiting requests into
the running batch whenever there is room (one prefill forward for all joiners), then runs one
decode step for every running row, and retires rows as soon as they finish or are cancelled. So
requests join and leave at token granularity and the batch stays full under load. Every request
has its own sampling params, seed and stop strings (see sampling.py).

Consumers hold an ``EngineRequest``: ``result()`` blocks, ``deltas()`` / ``adeltas()`` stream text
as it becomes final, and ``cancel()`` (or closing a delta iterator) removes the row at the next
step. Pure torch + transformers: this module never imports Ray.
"""

from __future__ import annotations

import atexit
import inspect
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from aigc_ray.engine.batch import RunningBatch, check_cache_supported, left_pad
from aigc_ray.engine.params import (
    ContextLengthError,
    EngineError,
    GenerationResult,
    InvalidParamError,
    SamplingParams,
    resolve_device,
    resolve_dtype,
    validate_params,
)
from aigc_ray.engine.request import EngineRequest
from aigc_ray.engine.sampling import (
    RowState,
    Sampler,
    make_generator,
    prompt_token_logprobs,
    token_logprobs,
)

logger = logging.getLogger(__name__)

_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    # A scheduler thread still parked in torch at interpreter exit aborts the process
    # ("terminate called without an active exception"): stop them first.
    for engine in list(_ENGINES):
        engine.close()


class GenerationEngine:
    """Continuous-batching text generation over a causal LM and its tokenizer.

    Up to ``max_batch_size`` requests decode together; more wait in FIFO order. ``stats()``
    reports running/waiting counts and token totals for metrics.
    """

    name = "builtin"

    def __init__(self, model, tokenizer, max_batch_size: int = 32, own_cores: bool = False):
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
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._batch: RunningBatch | None = None
        self._sampler: Sampler | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._tok_lock = threading.Lock()
        self.counters = {"finished": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0,
                         "generated_tokens": 0, "steps": 0, "busy_s": 0.0}  # fmt: skip
        # Measured on 2 cores (torch 2.13 CPU, libgomp): the thread that runs torch's parallel
        # ops first gets OpenMP workers that spin between ops; threads after it get throttled
        # ones. Loading the weights does not count (it runs no parallel regions here); this
        # probe's forward does. own_cores=True (batch generation: nothing else needs these
        # cores): the scheduler thread starts now and runs the probe, so decode steps are fast
        # (~790 vs ~600 tok/s offline). own_cores=False (serving): the probe runs on the
        # caller's thread, the decode thread's workers are throttled, and the HTTP proxy and
        # router get the CPU between steps (bench_serve c=32: 470 vs 378 tok/s).
        self._ready = threading.Event()
        self._probe_error: BaseException | None = None
        if own_cores:
            with self._cv:
                self._ensure_thread()
            self._ready.wait()
            if self._probe_error is not None:
                raise self._probe_error
        else:
            self._probe_cache()
            self._ready.set()
        _ENGINES.add(self)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        max_batch_size: int = 32,
        own_cores: bool = False,
    ) -> GenerationEngine:
        """Load a HF model dir (model + tokenizer) onto ``device`` in ``dtype``, in eval mode.

        ``model_dir`` may be s3:// or gs://: it is copied to this node's cache first."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from aigc_ray.model import local_model_dir

        model_dir = local_model_dir(model_dir)
        torch_device = resolve_device(device)
        torch_dtype = (
            dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        model.to(torch_device).eval()
        logger.info("loaded %s on %s as %s", model_dir, torch_device, torch_dtype)
        return cls(model, tokenizer, max_batch_size=max_batch_size, own_cores=own_cores)

    # ------------------------------------------------------------ requests

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt`` (with the tokenizer's default special tokens, e.g. BOS)."""
        with self._tok_lock:
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

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

    def submit(
        self, prompt: str | list[int], params: SamplingParams, stream: bool = False
    ) -> EngineRequest:
        """Validate and queue one request (``prompt`` as text or token ids); return its handle.
        ``stream=True`` keeps the request's streamable text up to date at every token."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check(ids, params)
        row = RowState(len(ids), params, self.tokenizer, self.eos_ids)
        generator = make_generator(params.seed, self.device)
        req = EngineRequest(next(self._ids), ids, row, generator, stream)
        with self._cv:
            if self._closed:
                raise EngineError("engine is closed")
            self._waiting.append(req)
            self._ensure_thread()
            self._cv.notify()
        return req

    async def asubmit(
        self, prompt: str | list[int], params: SamplingParams, stream: bool = False
    ) -> EngineRequest:
        """``submit`` for asyncio callers (the built-in engine queues without waiting)."""
        return self.submit(prompt, params, stream)

    def generate(
        self, prompts: Sequence[str], params: Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Complete every prompt with its own params; results are in input order.

        All requests are validated first (raising as ``check_request`` does, before any is
        queued), then decoded with continuous batching, ``max_batch_size`` rows at a time.
        """
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} params")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, params, strict=True):
            self._check(ids, p)
        requests = [self.submit(ids, p) for ids, p in zip(encoded, params, strict=True)]
        try:
            return [req.result() for req in requests]
        finally:
            for req in requests:
                req.cancel()  # no-op when finished; frees the rows if we were interrupted

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Yield text deltas of one completion as they become final.

        Joined, the deltas equal the ``text`` that ``generate`` would return. The generator's
        return value (``result = yield from engine.stream(...)``) is the GenerationResult.
        Closing the generator cancels decoding.
        """
        req = self.submit(prompt, params, stream=True)
        yield from req.deltas()
        return req.result()

    @property
    def num_running(self) -> int:
        """Rows in the running batch right now (a lock-free read, for pacing decisions)."""
        batch = self._batch
        return len(batch.rows) if batch else 0

    def stats(self) -> dict:
        """Running and waiting request counts plus cumulative counters."""
        with self._cv:
            running = len(self._batch) if self._batch else 0
            return {"running": running, "waiting": len(self._waiting), **self.counters}

    def close(self) -> None:
        """Stop the scheduler thread; pending requests fail with EngineError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ scheduler thread

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="aigc-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            if not self._ready.is_set():
                try:
                    self._probe_cache()
                except BaseException as e:  # noqa: BLE001 - re-raised by __init__
                    self._probe_error = e
                    return
                finally:
                    self._ready.set()
            while True:
                joiners = self._next_joiners()
                if joiners is None:
                    return
                started = time.perf_counter()
                try:
                    if joiners:
                        self._prefill(joiners)
                    if self._batch:
                        self._decode_step()
                except Exception as e:  # noqa: BLE001 - fail the requests, keep the engine up
                    logger.exception("engine step failed; failing %d requests", self._in_flight())
                    self._fail_all(joiners, EngineError(f"generation failed: {e}"))
                self.counters["busy_s"] += time.perf_counter() - started

    def _next_joiners(self) -> list[EngineRequest] | None:
        """Waiting requests that fit in the batch (cancelled ones are finished on the way).
        Blocks while there is nothing to do; None once the engine is closed."""
        with self._cv:
            while not self._closed and not self._waiting and not self._batch:
                self._cv.wait()
            if self._closed:
                self._fail_all(list(self._waiting), EngineError("engine is closed"))
                self._waiting.clear()
                return None
            room = self.max_batch_size - (len(self._batch) if self._batch else 0)
            joiners = []
            while self._waiting and len(joiners) < room:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._retire(req)
                else:
                    joiners.append(req)
            return joiners

    def _prefill(self, joiners: list[EngineRequest]) -> None:
        """One forward over the joiners' prompts; sample their first tokens; merge them in."""
        ids, mask, positions = left_pad([r.prompt_ids for r in joiners], self.pad_id, self.device)
        logits, cache = self._forward(ids, mask, positions, None)
        sampler = Sampler([r.row.params for r in joiners], [r.generator for r in joiners],
                          self.device)  # fmt: skip
        tokens = sampler(logits)
        part = RunningBatch(joiners, cache, mask, tokens, positions[:, -1] + 1)
        if self._batch is None or not self._batch.rows:
            self._batch = part
        else:
            self._batch.merge(part)
        self._sampler = None
        self.counters["prompt_tokens"] += sum(len(r.prompt_ids) for r in joiners)
        for req in joiners:
            if req.row.params.prompt_logprobs is not None:
                req.row.prompt_logprobs = self._score_prompt(req)
        self._accept(joiners, tokens, logits)

    def _decode_step(self) -> None:
        batch = self._batch
        if self._sampler is None:
            self._sampler = Sampler([r.row.params for r in batch.rows],
                                    [r.generator for r in batch.rows], self.device)  # fmt: skip
        feed_mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        logits, batch.cache = self._forward(batch.next_tokens[:, None], feed_mask,
                                            batch.next_positions[:, None], batch.cache)  # fmt: skip
        tokens = self._sampler(logits)
        batch.advance(tokens)
        self.counters["steps"] += 1
        self._accept(batch.rows, tokens, logits)

    def _accept(self, rows: list[EngineRequest], tokens: torch.Tensor, logits) -> None:
        """Push each row's new token, wake its consumers, retire finished/cancelled rows."""
        now = time.perf_counter()
        entries = self._logprob_entries(rows, tokens, logits)
        for req, token in zip(rows, tokens.tolist(), strict=True):
            req._push([token], now, entries.get(id(req)))
            if not req.row.finished:
                req._wake_stream()
        self.counters["generated_tokens"] += len(rows)
        batch = self._batch
        keep = [i for i, r in enumerate(batch.rows) if not (r.row.finished or r.cancelled)]
        if len(keep) == len(batch):
            return
        kept = set(keep)  # the snapshot, not the flags again: cancel() may land meanwhile
        for i, req in enumerate(batch.rows):
            if i not in kept:
                self._retire(req)
        with self._cv:
            batch.keep(keep)
        self._sampler = None

    @staticmethod
    def _logprob_entries(rows: list[EngineRequest], tokens: torch.Tensor, logits) -> dict:
        """{id(request): [TokenLogprob]} for the rows that asked for logprobs."""
        wanted = [i for i, r in enumerate(rows) if r.row.params.logprobs is not None]
        if not wanted:
            return {}
        index = torch.tensor(wanted, device=tokens.device)
        top_n = max(rows[i].row.params.logprobs for i in wanted)
        entries = token_logprobs(logits.index_select(0, index), tokens[index], top_n)
        out = {}
        for i, entry in zip(wanted, entries, strict=True):
            entry.top = entry.top[: rows[i].row.params.logprobs]
            out[id(rows[i])] = [entry]
        return out

    def _retire(self, req: EngineRequest, error: BaseException | None = None) -> None:
        key = (
            "failed"
            if error
            else "cancelled"
            if req.cancelled and not req.row.finished
            else "finished"
        )
        self.counters[key] += 1
        req._finish(error)

    def _fail_all(self, joiners: list[EngineRequest], error: EngineError) -> None:
        rows = list(self._batch.rows) if self._batch else []
        for req in {id(r): r for r in [*rows, *joiners]}.values():
            if not req.done:
                self._retire(req, error)
        self._batch, self._sampler = None, None

    def _in_flight(self) -> int:
        return len(self._batch) if self._batch else 0

    def _forward(self, input_ids, mask, positions, cache):
        """One model call; returns (last-position logits [rows, vocab], updated KV cache)."""
        extra = {self._cache_name: cache}
        if self._keep_last_logits:
            extra["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **extra)  # fmt: skip
        return out.logits[:, -1, :], getattr(out, self._cache_name)

    def _score_prompt(self, req: EngineRequest) -> list:
        """Prompt logprobs: one forward over the whole prompt (rare: evaluation requests)."""
        ids = torch.tensor([req.prompt_ids], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0]
        return prompt_token_logprobs(logits, req.prompt_ids, req.row.params.prompt_logprobs)

    @torch.inference_mode()
    def _probe_cache(self) -> None:
        """Fail at start, not at the first request, if the model's cache cannot be batched."""
        ids = torch.tensor([[self.pad_id]], device=self.device)
        _, cache = self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), None)
        check_cache_supported(cache)


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
