"""VllmEngine: vLLM's async engine (``AsyncLLM``) behind the same interface as the built-in engine.

``submit`` / ``asubmit`` return the same EngineRequest handle, so the Serve model server, batch
generation, metrics and errors do not care which engine runs. vLLM's AsyncLLM lives on an event
loop: the caller's (``on_caller_loop``: a Serve replica, which then has one loop for HTTP and
vLLM's output handling, as vLLM's own server does) or one in a thread of its own (a Ray Data
actor's threads call ``submit``); its engine core runs in a child process, as in vLLM's own
server. Requests are validated here with the same rules as the built-in engine (so a bad request
is the same 400 on both), then handed to vLLM as token ids; a cancelled request is aborted in
vLLM (no more tokens generated).

Never imports Ray: the Serve layer passes Ray's Prometheus stat logger in ``stat_loggers``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from typing import Any

from aigc_ray.engine.params import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    EngineUnavailableError,
    GenerationResult,
    InvalidParamError,
    SamplingParams,
    TokenLogprob,
    new_counters,
    validate_params,
)
from aigc_ray.engine.request import EngineRequest
from aigc_ray.engine.vllm_lora_ops import ENV as LORA_OPS_ENV
from aigc_ray.errors import root_cause

logger = logging.getLogger(__name__)


class VllmRow:
    """Output of one request as vLLM reports it: token deltas, text (vLLM's detokenizer already
    cuts stop strings and holds back partial ones), logprobs, finish reason."""

    def __init__(self, prompt_tokens: int, params: SamplingParams):
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def stream_text(self) -> str:
        return self.text

    def push(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        self.token_ids.extend(tokens)
        if self.logprobs is not None and logprobs:
            self.logprobs.extend(logprobs)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            finish_reason=self.finish_reason or "length",
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )


def _entries(position_logprobs, chosen: list[int], top_n: int) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob} dicts -> TokenLogprob (top by rank)."""
    out = []
    for token, position in zip(chosen, position_logprobs, strict=False):
        ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)
        top = [(tid, lp.logprob) for tid, lp in ranked[:top_n]]
        out.append(TokenLogprob(token, position[token].logprob, top))
    return out


def stats_logger_factory(counters: dict):
    """A vLLM stat logger class that keeps the engine's own counts in ``counters``: running and
    waiting requests, KV-cache usage, prompt and generated tokens, steps."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.counters = counters

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            c = self.counters
            if scheduler_stats is not None:
                c["running"] = scheduler_stats.num_running_reqs
                c["waiting"] = scheduler_stats.num_waiting_reqs
                c["kv_cache_usage"] = scheduler_stats.kv_cache_usage
            if iteration_stats is not None:
                c["generated_tokens"] += iteration_stats.num_generation_tokens
                c["prompt_tokens"] += iteration_stats.num_prompt_tokens
                c["steps"] += 1

        def log_engine_initialized(self):
            pass

    return _Logger


class VllmEngine:
    """Continuous batching by vLLM (paged attention, its own scheduler and kernels)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_batch_size: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        quantization: str | None = None,
        enable_prefix_caching: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
        stat_loggers: list | None = None,
        warm_up: bool = True,
        adapters: dict[str, str] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        on_caller_loop: bool = False,
        cpu_isolation: bool = False,
    ):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_dir = model_dir
        args = engine_args(
            model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            max_batch_size=max_batch_size,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            quantization=quantization,
            enable_prefix_caching=enable_prefix_caching,
            engine_kwargs=engine_kwargs,
            lora=(max_loras, max_lora_rank) if adapters else None,
        )
        self.adapters = VllmAdapters(adapters or {}, model_dir, max_lora_rank)
        self.counters = new_counters(running=0, waiting=0, kv_cache_usage=0.0)
        loggers = [stats_logger_factory(self.counters), *(stat_loggers or [])]
        if _on_cpu(args):
            size_cpu_kv_cache(args, model_dir, available_memory())
            # Ray sets OMP_NUM_THREADS to an actor's CPUs; vLLM then keeps that many torch
            # threads in its engine processes, whose OpenMP workers spin between ops and take
            # CPU from the forward pass. Unset, vLLM binds its worker to its own cores and runs
            # the engine loop single-threaded, as in its own server.
            os.environ.pop("OMP_NUM_THREADS", None)
            if adapters:  # vLLM's processes then apply LoRA per adapter, not per token
                os.environ.setdefault(LORA_OPS_ENV, "1")  # (vllm_lora_ops; "0" keeps vLLM's)
        # On the caller's running loop (a replica's: its constructor runs on it), AsyncLLM starts
        # its output handler there: tokens reach the HTTP responses without a hop between
        # threads (bench_serve, engine vllm at c=32). Else on a loop of its own, in a thread.
        self.on_caller_loop = on_caller_loop
        self._thread: threading.Thread | None = None
        self._failed: EngineDeadError | None = None  # the warm-up on the caller's loop failed
        self._warming: asyncio.Task | None = None
        if on_caller_loop:
            self._loop = asyncio.get_running_loop()
        else:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="aigc-vllm", daemon=True
            )
            self._thread.start()

        def start():
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=loggers)

        async def start_on_loop():
            return start()

        log = StderrTail()  # vLLM's engine core logs its own error there, not in `e`
        try:
            if on_caller_loop:  # the caller's loop is running: AsyncLLM's handler starts there
                self.llm = start()
            else:
                self.llm = asyncio.run_coroutine_threadsafe(start_on_loop(), self._loop).result()
        except Exception as e:
            self._stop_loop()
            # vLLM's own reason, else its message ("... See root cause above": in this log)
            why = root_cause(log.new_text()) or f"{type(e).__name__}: {e}"
            raise EngineUnavailableError(f"vLLM could not load {model_dir}: {why}") from e
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.context_window = int(self.llm.model_config.max_model_len)
        self.max_logprobs = int(getattr(self.llm.model_config, "max_logprobs", 20))
        self._ids = itertools.count()
        self._live: dict[str, EngineRequest] = {}
        self._closed = False
        self.args = args
        # vLLM's CPU worker has bound itself to its cores by now: keep the rest off them (last
        # before the warm-up, whose failure close()s, and close() gives the cores back)
        self.isolation = _isolate_cpus() if cpu_isolation and _on_cpu(args) else None
        try:
            if warm_up and on_caller_loop:  # its loop runs once the caller's constructor returns
                self._warming = self._loop.create_task(self._awarm_up())
            elif warm_up:
                self._warm_up()
        except EngineError as e:
            self.close()
            raise EngineUnavailableError(
                f"vLLM loaded {model_dir} but failed its first request ({e}); vLLM's own error "
                "is in this process's log"
            ) from e
        logger.info("vLLM engine ready for %s (%s)", model_dir, args)

    def _warm_up_request(self):
        ids = [self.encode("a")[-1]] * 2
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
        return self._prepare(ids, params, False)

    def _warm_up(self) -> None:
        """One request through the logprobs paths: their first use costs vLLM ~3.5 s here
        (measured on CPU), which would otherwise land on a user's first evaluation request."""
        req, sp = self._warm_up_request()
        asyncio.run_coroutine_threadsafe(self._start(req, sp), self._loop).result()
        req.result(timeout=600)

    async def _awarm_up(self) -> None:
        """``_warm_up`` on the caller's loop: requests wait for it; if it fails, the engine
        counts as dead (the replica fails its health check and is replaced)."""
        try:
            req, sp = self._warm_up_request()
            await self._start(req, sp)
            await req.aresult()
        except Exception as e:
            logger.error("vLLM failed its first request on %s: %s", self.model_dir, e)
            self._failed = EngineDeadError(f"vLLM failed its first request ({e})")

    # ------------------------------------------------------------ requests

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def count_tokens(self, prompt: str) -> int:
        return len(self.encode(prompt))

    def check_request(self, prompt: str, params: SamplingParams) -> int:
        return self._check(self.encode(prompt), params)

    def _check(self, ids: list[int], params: SamplingParams) -> int:
        validate_params(params)
        if not ids:
            raise InvalidParamError("prompt must contain at least one token", "prompt")
        if len(ids) + params.max_tokens > self.context_window:
            raise ContextLengthError(len(ids), params.max_tokens, self.context_window)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise InvalidParamError(
                    f"{name} must be at most {self.max_logprobs} on this server, got {value}", name
                )
        return len(ids)

    def _sampling_params(self, params: SamplingParams):
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return VllmParams(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                stop=list(params.stop) or None,
                seed=params.seed,
                ignore_eos=params.ignore_eos,
                logprobs=params.logprobs,
                prompt_logprobs=params.prompt_logprobs,
                output_kind=RequestOutputKind.DELTA,
                skip_special_tokens=True,
            )
        except Exception as e:  # noqa: BLE001 - vLLM's validation, as a named 400
            raise InvalidParamError(str(e), getattr(e, "parameter", None) or "body") from None

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        stream: bool = False,
        adapter: str | None = None,
    ) -> EngineRequest:
        """Validate and hand one request to vLLM; return its handle (any thread). ``adapter``
        names a LoRA adapter of ``adapters`` (AdapterError when unknown or unusable)."""
        if self.on_caller_loop and asyncio._get_running_loop() is self._loop:
            raise RuntimeError("VllmEngine.submit blocks its own loop here: use asubmit")
        req, sp = self._prepare(prompt, params, stream)
        lora = self.adapters.request(adapter)
        future = asyncio.run_coroutine_threadsafe(self._start(req, sp, lora), self._loop)
        future.result()
        return req

    async def asubmit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        stream: bool = False,
        adapter: str | None = None,
    ) -> EngineRequest:
        """``submit`` for asyncio callers: vLLM's admission runs without blocking their loop."""
        if self._warming is not None and not self._warming.done():
            await asyncio.shield(self._warming)
        req, sp = self._prepare(prompt, params, stream)
        lora = self.adapters.request(adapter)
        if self.on_caller_loop:  # the loop running this coroutine
            await self._start(req, sp, lora)
            return req
        future = asyncio.run_coroutine_threadsafe(self._start(req, sp, lora), self._loop)
        await asyncio.wrap_future(future)
        return req

    def _prepare(self, prompt, params: SamplingParams, stream: bool):
        if self._closed:
            raise EngineError("engine is closed")
        if self.llm.errored:
            raise EngineDeadError("vLLM's engine process died; this replica is being replaced")
        if self._failed is not None:
            raise self._failed
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check(ids, params)
        sp = self._sampling_params(params)
        req = EngineRequest(next(self._ids), ids, VllmRow(len(ids), params), None, stream)
        return req, sp

    async def _start(self, req: EngineRequest, sp, lora=None) -> None:
        from vllm.inputs import TokensPrompt

        rid = f"aigc-{req.id}"
        try:
            collector = await self.llm.add_request(
                rid, TokensPrompt(prompt_token_ids=req.prompt_ids), sp, lora_request=lora
            )
        except Exception as e:
            raise _translate(e) from None
        task = asyncio.get_running_loop().create_task(self._pump(req, rid, collector))
        self._live[rid] = req
        req._on_cancel.append(lambda: self._loop.call_soon_threadsafe(task.cancel))

    async def _pump(self, req: EngineRequest, rid: str, collector) -> None:
        """Move vLLM's outputs into the request until it finishes, is cancelled, or fails."""
        row: VllmRow = req.row
        error: BaseException | None = None
        try:
            finished = False
            while not finished:
                out = collector.get_nowait() or await collector.get()
                finished = out.finished
                if out.prompt_logprobs is not None and row.prompt_logprobs is None:
                    first = [None] + _entries(
                        out.prompt_logprobs[1:], req.prompt_ids[1:], row.params.prompt_logprobs or 0
                    )
                    row.prompt_logprobs = first
                if not out.outputs:
                    continue
                c = out.outputs[0]
                tokens = list(c.token_ids)
                lps = _entries(c.logprobs, tokens, row.params.logprobs or 0) if c.logprobs else None
                row.text += c.text
                if finished:
                    row.finish_reason = (
                        "cancelled" if c.finish_reason == "abort" else (c.finish_reason or "length")
                    )
                req._push(tokens, time.perf_counter(), lps)
                if not finished:
                    req._wake_stream()
        except asyncio.CancelledError:
            await self.llm.abort(rid)
        except Exception as e:  # noqa: BLE001 - the request fails, the caller gets a clean error
            error = _translate(e)
            if not isinstance(error, EngineDeadError):
                await self.llm.abort(rid)
        finally:
            collector.close()
            self._live.pop(rid, None)
            key = (
                "failed"
                if error
                else "cancelled"
                if req.cancelled and not row.finished
                else ("finished")
            )
            self.counters[key] += 1
            req._finish(error)

    # ------------------------------------------------------------ engine state

    @property
    def num_running(self) -> int:
        return int(self.counters["running"])

    @property
    def dead(self) -> bool:
        return bool(self.llm.errored) or self._failed is not None

    def stats(self) -> dict:
        """vLLM's own counts (from its stat logger) plus our per-request outcomes."""
        return dict(self.counters)

    def engine_pids(self) -> list[int]:
        """Process ids of vLLM's engine processes under this one (tests kill one)."""
        import psutil

        children = psutil.Process().children(recursive=True)
        return [p.pid for p in children if "EngineCore" in " ".join(_names(p))]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.llm.shutdown()
        finally:
            self._stop_loop()
            if self.isolation is not None:
                self.isolation.restore()

    def _stop_loop(self) -> None:
        if self.on_caller_loop:  # the caller's loop: not ours to stop
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def engine_args(
    model_dir: str,
    *,
    dtype: str,
    max_model_len: int | None,
    max_batch_size: int | None,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    quantization: str | None,
    enable_prefix_caching: bool,
    engine_kwargs: dict | None,
    lora: tuple[int, int] | None = None,
) -> dict:
    """AsyncEngineArgs keywords (pure: unit-tested without vLLM). A replica spanning several
    GPUs (tensor_parallel_size > 1) runs vLLM's workers on Ray, inside the replica's placement
    group, as Ray Serve LLM does."""
    args: dict[str, Any] = {
        "model": model_dir,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_prefix_caching": enable_prefix_caching,
        "seed": 0,
        "disable_log_stats": True,  # our stat logger still records; no periodic log lines
    }
    if max_model_len:
        args["max_model_len"] = max_model_len
    if max_batch_size:
        args["max_num_seqs"] = max_batch_size
    if quantization:
        args["quantization"] = quantization
    if tensor_parallel_size > 1:
        args["distributed_executor_backend"] = "ray"
    if lora:  # (max_loras, max_lora_rank): vLLM's --enable-lora
        args.update(enable_lora=True, max_loras=lora[0], max_lora_rank=lora[1])
    args.update(engine_kwargs or {})
    return args


class VllmAdapters:
    """The LoRA adapters (name -> PEFT directory) vLLM serves over its base model, as
    LoRARequests. vLLM loads an adapter in its engine core at the first request that names it
    and evicts the least recently used beyond ``max_loras``; an adapter it cannot use would fail
    there, so each is read here first (once) with the built-in engine's checks (lora.py: files,
    base model, rank): a bad one is that request's AdapterError, 400, and vLLM never sees it."""

    def __init__(self, paths: dict[str, str], model_dir: str, max_rank: int):
        self.paths, self.model_dir, self.max_rank = dict(paths), model_dir, max_rank
        self._ready: dict[str, Any] = {}  # name -> LoRARequest, once checked
        self._lock = threading.Lock()

    def request(self, name: str | None):
        if name is None:
            return None
        from aigc_ray.engine.lora import AdapterError, read_adapter

        if name not in self.paths:
            raise AdapterError(
                f"adapter {name!r} not found; available: {sorted(self.paths)}", status=404
            )
        with self._lock:
            if name not in self._ready:
                import torch
                from transformers import AutoConfig
                from vllm.lora.request import LoRARequest

                from aigc_ray.storage import local_model_dir

                path = self.paths[name]
                config = AutoConfig.from_pretrained(self.model_dir)
                read_adapter(name, path, config, self.max_rank, torch.float32, "cpu")
                local = local_model_dir(path)  # checked readable just above
                ids = len(self._ready) + 1  # vLLM's id of an adapter: unique per name
                self._ready[name] = LoRARequest(name, ids, str(local))
            return self._ready[name]


def _translate(e: BaseException) -> BaseException:
    """vLLM's exceptions as the engine interface's: validation -> InvalidParamError (a 400
    naming the parameter), a dead engine -> EngineDeadError (503), anything else EngineError."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

    if isinstance(e, InvalidParamError | EngineError):
        return e
    if isinstance(e, VllmDead):
        return EngineDeadError(f"vLLM's engine process died: {e}")
    if isinstance(e, VLLMClientError | ValueError):
        return InvalidParamError(str(e), getattr(e, "parameter", None) or "body")
    return EngineError(f"generation failed: {type(e).__name__}: {e}")


def _names(proc) -> list[str]:
    try:
        return [proc.name(), *proc.cmdline()]
    except Exception:  # noqa: BLE001 - a process that just exited has no name
        return []


# ---------------------------------------------------------------- vLLM's CPU build

GiB = 1024**3
CPU_KV_SHARE = 0.25  # of the memory free now, at most, for one replica's KV cache (default)
CPU_KV_SEQS = 64  # full-length sequences the default KV cache is sized for, at most


def available_memory() -> int:
    """Bytes of memory free for new allocations now (the kernel's MemAvailable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """K and V of one token over every layer: 2 x layers x KV heads x head size x dtype size."""
    import torch

    layers = config.get("num_hidden_layers") or config["n_layer"]
    heads = config.get("num_attention_heads") or config["n_head"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or config["n_embd"]) // heads
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return 2 * layers * kv_heads * head_dim * size


def size_cpu_kv_cache(args: dict, model_dir: str, free: int) -> None:
    """The KV cache of vLLM's CPU build, when nothing sets it (kv_cache_memory_gb,
    engine_kwargs.kv_cache_memory_bytes, VLLM_CPU_KVCACHE_SPACE): room for CPU_KV_SEQS
    sequences of the full context (or max_num_seqs, if fewer), at most CPU_KV_SHARE of the memory
    free now, and never less than one full sequence. vLLM's own default there reserves
    gpu_memory_utilization (0.9) of all memory and refuses to start unless that much is free,
    which a machine running anything else never has. An explicit size that exceeds what is free
    is refused here, with the numbers, before vLLM starts."""
    import json
    from pathlib import Path

    explicit = args.get("kv_cache_memory_bytes")
    if explicit is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        explicit = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    if explicit is not None:
        if explicit > free:
            raise EngineUnavailableError(
                f"vLLM's KV cache of {explicit / GiB:.2f} GiB for {model_dir} does not fit in "
                f"the {free / GiB:.2f} GiB of memory free on this node: lower "
                "serve.vllm.kv_cache_memory_gb (or generate.vllm.kv_cache_memory_gb), or leave "
                "it empty to size it from the free memory"
            )
        return
    config = json.loads((Path(model_dir) / "config.json").read_text())
    context = args.get("max_model_len") or config.get("max_position_embeddings") or 2048
    per_seq = kv_bytes_per_token(config, args.get("dtype") or "float32") * int(context)
    want = per_seq * min(CPU_KV_SEQS, args.get("max_num_seqs") or CPU_KV_SEQS)
    size = min(want, int(free * CPU_KV_SHARE))
    if size < per_seq:
        raise EngineUnavailableError(
            f"vLLM needs {per_seq / GiB:.2f} GiB of KV cache for one {context}-token sequence "
            f"of {model_dir}, more than {CPU_KV_SHARE:.0%} of the {free / GiB:.2f} GiB free on "
            "this node: set serve.max_model_len lower, or serve.vllm.kv_cache_memory_gb"
        )
    args["kv_cache_memory_bytes"] = size
    logger.info(
        "vLLM on CPU: KV cache %.3f GiB for %s (%d full %d-token sequences; %.1f GiB free)",
        size / GiB,
        model_dir,
        size // per_seq,
        context,
        free / GiB,
    )


class StderrTail:
    """What is written to this process's stderr from now on, when stderr is a file (a Ray
    worker's log): vLLM's engine core, a child process sharing it, logs the real reason it
    failed there and raises only "Engine core initialization failed. See root cause above"."""

    def __init__(self):
        try:
            self.path = os.readlink("/proc/self/fd/2")
            self.start = os.path.getsize(self.path) if os.path.isfile(self.path) else None
        except OSError:
            self.path, self.start = None, None

    def new_text(self, limit: int = 200_000) -> str:
        if self.start is None:
            return ""
        with open(self.path, "rb") as f:
            f.seek(max(self.start, os.path.getsize(self.path) - limit))
            return f.read().decode(errors="replace")


def _isolate_cpus():
    """CpuIsolation.apply(), never fatal: the engine serves either way, only slower."""
    from aigc_ray.engine.cpu_isolation import CpuIsolation

    try:
        return CpuIsolation.apply()
    except Exception as e:  # noqa: BLE001 - an optimization; say why it did not apply
        logger.warning("cpu isolation not applied: %s: %s", type(e).__name__, e)
        return None


def _on_cpu(args: dict) -> bool:
    from vllm.platforms import current_platform

    return current_platform.device_type == "cpu"
