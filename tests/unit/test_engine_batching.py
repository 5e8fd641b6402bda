"""Continuous batching in aigc_ray.engine: joins mid-flight, cancellation, failures, pacing."""

import asyncio
import time

import pytest
import torch
from engine_support import PROMPTS, hf_greedy, slowed

from aigc_ray.engine import EngineError, GenerationEngine, SamplingParams
from aigc_ray.engine.batch import RunningBatch, check_cache_supported


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("own_cores", [False, True])
def test_requests_joining_mid_flight_match_hf_generate(model, tokenizer, own_cores, fast):  # noqa: F811
    """A long request is decoding when others join (and leave) at token granularity: every
    greedy output still equals transformers' generate on that prompt alone (with the probe on
    the caller's thread, as in serving, or in the engine thread, as in batch generation)."""
    eng = GenerationEngine(model, tokenizer, max_batch_size=3, own_cores=own_cores, fast=fast)
    with slowed(eng, 0.002):
        long = eng.submit(PROMPTS[3], SamplingParams(max_tokens=40, temperature=0))
        wait_for(lambda: len(long.row.token_ids) >= 5)
        lengths = (7, 12, 3, 9)  # short ones finish and free slots while `long` keeps going
        joiners = [
            eng.submit(p, SamplingParams(max_tokens=n, temperature=0))
            for p, n in zip(PROMPTS, lengths, strict=True)
        ]
        assert long.result(30).token_ids == hf_greedy(model, tokenizer, PROMPTS[3], 40)
    for req, prompt, n in zip(joiners, PROMPTS, lengths, strict=True):
        assert req.result(30).token_ids == hf_greedy(model, tokenizer, prompt, n)
    assert eng.stats()["running"] == 0 and eng.stats()["finished"] == 5
    assert eng.stats()["steps"] < 40 + sum(lengths)  # rows shared decode steps
    eng.close()


@pytest.mark.parametrize("fast", [True, False])
def test_cancel_stops_generation_and_frees_the_row(model, tokenizer, fast):  # noqa: F811
    eng = GenerationEngine(model, tokenizer, fast=fast)
    with slowed(eng, 0.002):
        victim = eng.submit(PROMPTS[1], SamplingParams(max_tokens=100, temperature=0))
        other = eng.submit(PROMPTS[2], SamplingParams(max_tokens=30, temperature=0))
        wait_for(lambda: len(victim.row.token_ids) >= 3)
        victim.cancel()
        result = victim.result(10)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 100
    produced = eng.stats()["generated_tokens"]
    assert other.result(10).token_ids == hf_greedy(model, tokenizer, PROMPTS[2], 30)
    # after the cancel only `other` advanced: at most its 30 tokens were added
    assert eng.stats()["generated_tokens"] - produced <= 30
    assert eng.stats()["cancelled"] == 1 and eng.stats()["running"] == 0
    eng.close()


def test_cancelled_while_waiting_never_runs(model, tokenizer):  # noqa: F811
    eng = GenerationEngine(model, tokenizer, max_batch_size=1)
    first = eng.submit(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0))
    queued = eng.submit(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0))
    queued.cancel()
    first.result(10)
    assert queued.result(10).completion_tokens == 0
    assert queued.result().finish_reason == "cancelled"
    eng.close()


@pytest.mark.parametrize("fast", [True, False])
def test_a_failing_step_fails_its_requests_and_the_engine_recovers(model, tokenizer, fast):  # noqa: F811
    eng = GenerationEngine(model, tokenizer, fast=fast)
    real = eng.runner.decode
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real()

    eng.runner.decode = flaky
    doomed = eng.submit(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))
    with pytest.raises(EngineError, match="simulated"):
        doomed.result(10)
    eng.runner.decode = real
    ok = eng.submit(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0)).result(10)
    assert ok.token_ids == hf_greedy(model, tokenizer, PROMPTS[0], 5)
    assert eng.stats()["failed"] == 1
    if fast:  # every slot is free again
        assert sorted(eng.runner.free) == list(range(eng.max_batch_size))
    eng.close()


def test_ignore_eos_generates_exactly_max_tokens(model, tokenizer):  # noqa: F811
    ref = hf_greedy(model, tokenizer, PROMPTS[2], 12)
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, ref[2]]
    try:
        eng = GenerationEngine(model, tokenizer)
        stopped = eng.generate([PROMPTS[2]], [SamplingParams(max_tokens=12, temperature=0)])
        forced = eng.generate(
            [PROMPTS[2]], [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
        )
        eng.close()
    finally:
        model.generation_config.eos_token_id = original
    assert stopped[0].completion_tokens == 3 and stopped[0].finish_reason == "stop"
    assert forced[0].token_ids == ref and forced[0].finish_reason == "length"


def test_adeltas_stream_pacing_and_cancel_on_close(engine):  # noqa: F811
    params = SamplingParams(max_tokens=30, temperature=0)
    expected = engine.generate([PROMPTS[1]], [params])[0].text

    async def collect(interval):
        req = engine.submit(PROMPTS[1], params, stream=True)
        deltas = [d async for d in req.adeltas(interval)]
        return deltas, req.result()

    fast, result = asyncio.run(collect(None))
    assert "".join(fast) == expected == result.text
    with slowed(engine, 0.02):  # 30 tokens outlast the consumer's first wake-up (>= 0.6 s)
        paced, _ = asyncio.run(collect(lambda: 10.0))  # first delta at once, then held to the end
    assert len(paced) == 2 and "".join(paced) == expected

    async def close_early():
        req = engine.submit(PROMPTS[1], SamplingParams(max_tokens=100, temperature=0), stream=True)
        stream = req.adeltas()
        await stream.__anext__()
        await stream.aclose()
        return req

    with slowed(engine):
        req = asyncio.run(close_early())
    assert req.result(10).finish_reason == "cancelled"


def test_aresult_cancelled_task_cancels_request(engine):  # noqa: F811
    async def main():
        req = engine.submit(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0))
        task = asyncio.create_task(req.aresult())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return req

    with slowed(engine):
        req = asyncio.run(main())
    assert req.result(10).finish_reason == "cancelled"
    assert req.result().completion_tokens < 100


def test_running_batch_merge_keep_and_trim():
    from transformers import DynamicCache

    def part(widths, fill):
        b, t = len(widths), max(widths)
        cache = DynamicCache()
        cache.update(torch.full((b, 2, t, 4), fill), torch.full((b, 2, t, 4), fill), 0)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, w in enumerate(widths):
            mask[i, t - w :] = 1
        return RunningBatch(
            list(range(b)), cache, mask, torch.zeros(b, dtype=torch.long), torch.tensor(widths)
        )

    a, b = part([3, 2], 1.0), part([5], 2.0)
    a.rows, b.rows = ["a0", "a1"], ["b0"]
    a.merge(b)
    assert a.rows == ["a0", "a1", "b0"] and a.width == 5
    assert a.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    keys = a.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 4)
    assert keys[0, 0, :2].abs().sum() == 0 and keys[2, 0, 0, 0] == 2.0  # padded left with 0s
    a.keep([0, 1])  # b0 leaves: the first two columns are padding for all: trimmed
    assert a.width == 3 and a.cache.layers[0].keys.shape == (2, 2, 3, 4)
    assert a.mask.tolist() == [[1, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("own_cores", [False, True])
def test_probe_error_reaches_the_constructor(model, tokenizer, own_cores, monkeypatch):  # noqa: F811
    """The probe's error reaches the constructor even when it ran in the engine thread."""
    import aigc_ray.engine.batch as batch

    def refuse(cache):
        raise NotImplementedError("only full-attention caches can be batched")

    monkeypatch.setattr(batch, "check_cache_supported", refuse)
    with pytest.raises(NotImplementedError, match="full-attention"):
        GenerationEngine(model, tokenizer, own_cores=own_cores, fast=False)


def test_unsupported_cache_is_refused_clearly():
    class Sliding:
        layers = [object()]

    with pytest.raises(NotImplementedError, match="full-attention"):
        check_cache_supported(Sliding())
