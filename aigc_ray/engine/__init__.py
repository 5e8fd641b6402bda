"""Text-generation engine shared by the Serve deployment and offline batch generation.

Continuous batching over a batched KV cache (core.py, batch.py), per-request sampling
(sampling.py) and request types (params.py). Pure torch + transformers: never imports Ray.
"""

from aigc_ray.engine.batch import RunningBatch, check_cache_supported, left_pad
from aigc_ray.engine.core import (
    EngineRequest,
    GenerationEngine,
    _context_window,
    _eos_token_ids,
    _pad_token_id,
)
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
from aigc_ray.engine.sampling import (
    RowState,
    Sampler,
    filter_logits,
    make_generator,
    stable_prefix,
)

__all__ = [
    "ContextLengthError",
    "EngineError",
    "EngineRequest",
    "GenerationEngine",
    "GenerationResult",
    "InvalidParamError",
    "RowState",
    "RunningBatch",
    "Sampler",
    "SamplingParams",
    "_context_window",
    "_eos_token_ids",
    "_pad_token_id",
    "check_cache_supported",
    "filter_logits",
    "left_pad",
    "make_generator",
    "resolve_device",
    "resolve_dtype",
    "stable_prefix",
    "validate_params",
]
