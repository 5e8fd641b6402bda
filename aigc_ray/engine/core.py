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
import itertools
import json
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from aigc_ray.engine.batch import HFRunner
from aigc_ray.engine.lora import AdapterBank, AdapterError
from aigc_ray.engine.params import (
    ContextLengthError,
    EngineError,
    GenerationResult,
    InvalidParamError,
    SamplingParams,
    new_counters,
    resolve_device,
    resolve_dtype,
    validate_params,
)
from aigc_ray.engine.quant import compressed_linear_factory, quantization_scheme
from aigc_ray.engine.request import EngineRequest
from aigc_ray.engine.sampling import (
    RowState,
    Sampler,
    make_generator,
    token_logprobs,
)
from aigc_ray.engine.slots import SlotRunner, fast_path_problem

logger = logging.getLogger(__name__)

DEFAULT_SLOT_LEN = 4096  # KV-cache columns per request when max_model_len is not given

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
    reports running/waiting counts and token totals for metrics. Llama-family models run on the
    slot decoder (slots.py: pre-allocated KV cache, fused projections, optional int8/int4
    linears); any other causal LM on transformers' own forward (batch.py). ``fast=False``
    forces the latter; ``max_len`` bounds the slot cache (prompt + completion per request).
    """

    name = "builtin"

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 32,
        own_cores: bool = False,
        fast: bool | None = None,
        max_len: int | None = None,
        linear=None,
        compile: bool = False,
        adapters: dict[str, str] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_token_ids(model, tokenizer)
        self.pad_id = _pad_token_id(tokenizer, self.eos_ids)
        self.context_window = _context_window(model, tokenizer)
        if max_len:
            self.context_window = min(self.context_window, max_len)
        problem = fast_path_problem(model) if fast is not False else "fast=False"
        if problem is None:
            # A pre-allocated cache: bound it (a 128k-token context would not fit in memory).
            self.context_window = min(self.context_window, max_len or DEFAULT_SLOT_LEN)
            self.path = "slots"
        elif fast:
            raise ValueError(f"the slot decoder cannot run this model: {problem}")
        else:
            self.path = "transformers"
        self.path_reason = problem or "Llama-family model"
        self._linear, self._compile = linear, compile
        self.bank = None  # LoRA adapters by name (lora.py), slot decoder only
        if adapters:
            if self.path != "slots":
                raise ValueError(
                    f"LoRA adapters need the slot decoder; this model runs on transformers "
                    f"({self.path_reason})"
                )
            self.bank = AdapterBank(
                adapters,
                model.config,
                max_loras,
                max_lora_rank,
                next(model.parameters()).dtype,
                self.device,
            )
        self.runner = None  # built by _start_runner, on the thread that will decode
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._sampler: Sampler | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._tok_lock = threading.Lock()
        self.counters = new_counters(busy_s=0.0)
        # Measured on 2 cores (torch 2.13 CPU, libgomp): the thread that runs torch's parallel
        # ops first gets OpenMP workers that spin between ops; threads after it get throttled
        # ones (a [64x512]x[512x512] matmul: 190 us on the first thread, 280 us on a later
        # one; a tiny model's batch-1 decode step: 3.8 vs 6.7 ms). Loading the weights does not
        # count (it runs no parallel regions here); packing them and the probe's forward do.
        # own_cores=True (batch generation: nothing else needs these cores): the scheduler
        # thread starts now, builds the runner and runs the probe, so decode steps are fast.
        # own_cores=False (serving): both run on the caller's thread, the decode thread's
        # workers are throttled, and the HTTP proxy and router get the CPU between steps.
        self._ready = threading.Event()
        self._probe_error: BaseException | None = None
        if own_cores:
            with self._cv:
                self._ensure_thread()
            self._ready.wait()
            if self._probe_error is not None:
                raise self._probe_error
        else:
            self._start_runner()
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
        max_len: int | None = None,
        adapters: dict[str, str] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
    ) -> GenerationEngine:
        """Load a HF model dir (model + tokenizer) onto ``device`` in ``dtype``, in eval mode,
        with LoRA ``adapters`` (name -> PEFT directory) requests may name.

        ``model_dir`` may be s3:// or gs://: it is copied to this node's cache first."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from aigc_ray.storage import local_model_dir

        model_dir = local_model_dir(model_dir)
        torch_device = resolve_device(device)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        saved = config.get("dtype") or config.get("torch_dtype")
        torch_dtype = (
            dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device, saved)
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        scheme = quantization_scheme(config)
        extra = {}
        if scheme is not None:  # compressed-tensors: load dequantized, run on int kernels
            from transformers import CompressedTensorsConfig

            extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)

        def load():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra)
            return model.to(torch_device).eval()

        # Decompressing a quantized directory runs parallel ops: on a thread of its own (gone
        # before the engine thread starts) it does not make the caller's thread the first
        # OpenMP user (see __init__), which would throttle decoding (measured: 21 vs 14 ms per
        # step for the same w8a8 model).
        model = _on_own_thread(load) if own_cores else load()
        linear = None
        if scheme is not None and torch_device.type == "cpu":
            linear = compressed_linear_factory(model, model_dir, scheme)
        settings = engine_settings(model_dir)
        logger.info(
            "loaded %s on %s as %s (%s)",
            model_dir,
            torch_device,
            torch_dtype,
            scheme["kind"] if scheme else "dense",
        )
        return cls(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            own_cores=own_cores,
            max_len=max_len,
            linear=linear,
            compile=settings.get("compile", False),
            adapters=adapters,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
        )

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
        self,
        prompt: str | list[int],
        params: SamplingParams,
        stream: bool = False,
        adapter: str | None = None,
    ) -> EngineRequest:
        """Validate and queue one request (``prompt`` as text or token ids); return its handle.
        ``stream=True`` keeps the request's streamable text up to date at every token.
        ``adapter`` names a LoRA adapter of ``adapters`` to decode this row with (loaded on
        first use; AdapterError when unknown or unusable)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check(ids, params)
        row = RowState(len(ids), params, self.tokenizer, self.eos_ids)
        generator = make_generator(params.seed, self.device)
        req = EngineRequest(next(self._ids), ids, row, generator, stream)
        if adapter is not None:
            if self.bank is None:
                raise AdapterError(f"adapter {adapter!r} not found; available: []", status=404)
            req.adapter = self.bank.acquire(adapter)  # AdapterError, AdaptersBusyError
        with self._cv:
            if self._closed:
                if self.bank is not None:
                    self.bank.release(req.adapter)
                raise EngineError("engine is closed")
            self._waiting.append(req)
            self._ensure_thread()
            self._cv.notify()
        return req

    async def asubmit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        stream: bool = False,
        adapter: str | None = None,
    ) -> EngineRequest:
        """``submit`` for asyncio callers (the built-in engine queues without waiting)."""
        return self.submit(prompt, params, stream, adapter)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: Sequence[SamplingParams] | SamplingParams,
    ) -> list[GenerationResult]:
        """Complete every prompt (text or token ids) with its own params (or one for all);
        results are in input order.

        All requests are validated first (raising as ``check_request`` does, before any is
        queued), then decoded with continuous batching, ``max_batch_size`` rows at a time.
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} params")
        encoded = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids, p in zip(encoded, params, strict=True):
            self._check(ids, p)
        requests = [self.submit(ids, p) for ids, p in zip(encoded, params, strict=True)]
        try:
            return [req.result() for req in requests]
        finally:
            for req in requests:
                req.cancel()  # no-op when finished; frees the rows if we were interrupted

    def generate_ids(self, prompts: Sequence[list[int]], params: SamplingParams):
        """``generate`` for token-id prompts sharing one set of params."""
        return self.generate(prompts, params)

    @torch.inference_mode()
    def nll(self, blocks: torch.Tensor, batch: int = 8) -> float:
        """Mean next-token negative log-likelihood over ``blocks`` [N, T] (perplexity = exp),
        computed with this engine's own kernels. Only while the engine is idle."""
        with self._cv:
            if self._waiting or (self.runner and self.runner.rows):
                raise EngineError("nll() needs an idle engine")
        total, count = 0.0, 0
        for i in range(0, len(blocks), batch):
            ids = blocks[i : i + batch].to(self.device)
            logits = self.runner.all_logits(ids)  # [B, T, vocab]
            logp = logits[:, :-1].float().log_softmax(-1)
            total -= float(logp.gather(-1, ids[:, 1:, None]).sum())
            count += ids[:, 1:].numel()
        return total / max(count, 1)

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
        return len(self.runner.rows)

    def stats(self) -> dict:
        """Running and waiting request counts, KV-cache use (slot path), cumulative counters."""
        with self._cv:
            out = {"running": len(self.runner.rows), "waiting": len(self._waiting), **self.counters}
        usage = self.runner.kv_usage()
        if usage is not None:
            out["kv_cache_usage"] = usage
        return out

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
                    self._start_runner()
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
                    if self.runner.rows:
                        self._decode_step()
                except Exception as e:  # noqa: BLE001 - fail the requests, keep the engine up
                    logger.exception("engine step failed; failing %d requests", self._in_flight())
                    self._fail_all(joiners, EngineError(f"generation failed: {e}"))
                self.counters["busy_s"] += time.perf_counter() - started

    def _next_joiners(self) -> list[EngineRequest] | None:
        """Waiting requests that fit in the batch (cancelled ones are finished on the way).
        Blocks while there is nothing to do; None once the engine is closed."""
        with self._cv:
            while not self._closed and not self._waiting and not self.runner.rows:
                self._cv.wait()
            if self._closed:
                self._fail_all(list(self._waiting), EngineError("engine is closed"))
                self._waiting.clear()
                return None
            room = self.max_batch_size - len(self.runner.rows)
            joiners = []
            while self._waiting and len(joiners) < room:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._retire(req)
                else:
                    joiners.append(req)
            return joiners

    def _prefill(self, joiners: list[EngineRequest]) -> None:
        """The joiners' prompts into the running batch; sample their first tokens."""
        logits = self.runner.prefill(joiners)
        params, generators = [r.row.params for r in joiners], [r.generator for r in joiners]
        tokens = Sampler(params, generators, self.device)(logits)
        self.runner.advance(joiners, tokens)
        self._sampler = None
        self.counters["prompt_tokens"] += sum(len(r.prompt_ids) for r in joiners)
        self._accept(joiners, tokens, logits)

    def _decode_step(self) -> None:
        rows = list(self.runner.rows)
        if self._sampler is None:
            params, generators = [r.row.params for r in rows], [r.generator for r in rows]
            self._sampler = Sampler(params, generators, self.device)
        logits = self.runner.decode()
        tokens = self._sampler(logits)
        self.runner.advance(rows, tokens)
        self.counters["steps"] += 1
        self._accept(rows, tokens, logits)

    def _accept(self, rows: list[EngineRequest], tokens: torch.Tensor, logits) -> None:
        """Push each row's new token, wake its consumers, retire finished/cancelled rows."""
        now = time.perf_counter()
        entries = self._logprob_entries(rows, tokens, logits)
        for req, token in zip(rows, tokens.tolist(), strict=True):
            req._push([token], now, entries.get(id(req)))
            if not req.row.finished:
                req._wake_stream()
        self.counters["generated_tokens"] += len(rows)
        running = self.runner.rows
        keep = [i for i, r in enumerate(running) if not (r.row.finished or r.cancelled)]
        if len(keep) == len(running):
            return
        kept = set(keep)  # the snapshot, not the flags again: cancel() may land meanwhile
        for i, req in enumerate(running):
            if i not in kept:
                self._retire(req)
        with self._cv:
            self.runner.keep(keep)
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
        if error:
            key = "failed"
        else:
            key = "cancelled" if req.cancelled and not req.row.finished else "finished"
        self.counters[key] += 1
        if self.bank is not None:
            self.bank.release(req.adapter)
            req.adapter = 0
        req._finish(error)

    def _fail_all(self, joiners: list[EngineRequest], error: EngineError) -> None:
        rows = list(self.runner.rows)
        for req in {id(r): r for r in [*rows, *joiners]}.values():
            if not req.done:
                self._retire(req, error)
        self.runner.reset()
        self._sampler = None

    def _in_flight(self) -> int:
        return len(self.runner.rows)

    @torch.inference_mode()
    def _start_runner(self) -> None:
        """Build the running batch (the slot cache and packed weights, or transformers' path)
        and probe it: fail at start, not at the first request, if the model cannot be batched.
        Runs on the thread that will decode when the engine owns the cores."""
        if self.path == "slots":
            self.runner = SlotRunner(
                self.model,
                self.max_batch_size,
                self.context_window,
                self.pad_id,
                linear=self._linear,
                compile=self._compile,
            )
            if self.bank is not None:
                self.runner.decoder.bank = self.bank
        else:
            self.runner = HFRunner(self.model, self.pad_id)
        if isinstance(self.runner, HFRunner):
            self.runner.probe()
            return
        probe = EngineRequest(
            -1, [self.pad_id], RowState(1, SamplingParams(), self.tokenizer, set())
        )
        self.runner.prefill([probe])
        self.runner.keep([])


def _on_own_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name="aigc-load")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


ENGINE_SETTINGS = "aigc_ray_engine.json"  # written by aigc-ray optimize next to the weights


def engine_settings(model_dir: str) -> dict:
    """Engine settings an optimized directory carries (e.g. {"compile": true})."""
    path = Path(model_dir) / ENGINE_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}


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
