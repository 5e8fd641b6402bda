"""vLLM's CPU build with the defaults a user gets, and the reason shown when vLLM cannot start.

With nothing set, vLLM's CPU worker reserves gpu_memory_utilization (0.9) of all memory and
refuses to start unless that much is free; aigc_ray sizes the KV cache from the model and the
memory free instead (engine/vllm_engine.size_cpu_kv_cache). The pipeline test serves its model
with no vLLM setting at all (tests/e2e/test_pipeline.py: `auto` takes vLLM, compiled); here:
what a user sees when vLLM cannot start, on `engine: vllm` (the deploy fails naming the reason
and the app is deleted) and on `auto` (the built-in engine, vLLM's own reason in its report)."""

import httpx
import pytest
from serving import KEY, deployed, model_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOO_BIG = {"kv_cache_memory_gb": 4096.0}  # 4 TiB of KV cache: more than any node here has free


def _cfg(serve_port, tmp_path_factory, engine: str):
    from aigc_ray.config import ServeConfig

    return ServeConfig(
        port=serve_port,
        num_cpus=0.25,
        models=[
            {
                "name": "no-room",
                "model_dir": model_dir(tmp_path_factory, "a"),
                "engine": engine,
                "vllm": TOO_BIG,
            }
        ],
    )


def test_engine_vllm_that_cannot_start_fails_the_deploy_with_the_reason(
    ray_session, serve_port, tmp_path_factory
):
    from ray import serve

    from aigc_ray.serve import run_serve
    from aigc_ray.serve.security import ServeError

    with pytest.raises(ServeError) as err:
        run_serve(_cfg(serve_port, tmp_path_factory, "vllm"), app_name="no-room")
    message = str(err.value)
    assert "model-no-room: " in message and "EngineUnavailableError" in message, message
    assert "4096.00 GiB" in message and "GiB of memory free on this node" in message, message
    assert "Failed to update the deployments" not in message
    assert "no-room" not in serve.status().applications, "the failed app was left retrying"


def test_auto_falls_back_to_builtin_with_the_engine_cores_own_error(
    ray_session, serve_port, tmp_path_factory
):
    """A KV cache of 4 KiB passes our check (it fits in memory) and fails in vLLM's engine core,
    a child process that logs its error and tells the replica only "Engine core initialization
    failed. See root cause above". The replica reads that error back from its log (its stderr,
    which the engine core shares) and `auto` names it when it falls back to the built-in
    engine; the model then answers."""
    from aigc_ray.serve import engine_report

    cfg = _cfg(serve_port, tmp_path_factory, "auto")
    tiny_kv = {"engine_kwargs": {"kv_cache_memory_bytes": 4096, "enforce_eager": True}}
    cfg.models[0].vllm = cfg.models[0].vllm.model_copy(
        update={"kv_cache_memory_gb": None, **tiny_kv}
    )
    with deployed(cfg, app="no-room-auto") as url:
        info = engine_report("no-room-auto")["no-room"]
        assert info["engine"] == "builtin", info
        reason = info["engine_reason"]
        assert "ValueError: No available memory for the cache blocks" in reason, reason
        assert "See root cause above" not in reason, reason
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "no-room", "prompt": "def f():", "max_tokens": 3, "ignore_eos": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
