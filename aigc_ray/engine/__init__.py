"""Text-generation engines behind one interface, shared by the Serve model server and offline
batch generation: the built-in engine (torch + transformers, continuous batching; core.py) and
vLLM (vllm_engine.py). ``load_engine`` picks one (``engine: auto | vllm | builtin``, loader.py).

Both return an EngineRequest (request.py) from ``submit`` / ``asubmit``; both validate requests
the same way (params.py). Never imports Ray.
"""

from aigc_ray.engine.core import GenerationEngine
from aigc_ray.engine.loader import EngineChoice, choose_engine, load_engine, vllm_distribution
from aigc_ray.engine.lora import AdapterError
from aigc_ray.engine.params import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    EngineUnavailableError,
    GenerationResult,
    InvalidParamError,
    SamplingParams,
    TokenLogprob,
)
from aigc_ray.engine.request import EngineRequest

__all__ = [
    "AdapterError",
    "ContextLengthError",
    "EngineChoice",
    "EngineDeadError",
    "EngineError",
    "EngineRequest",
    "EngineUnavailableError",
    "GenerationEngine",
    "GenerationResult",
    "InvalidParamError",
    "SamplingParams",
    "TokenLogprob",
    "choose_engine",
    "load_engine",
    "vllm_distribution",
]
