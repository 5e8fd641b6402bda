"""LoRA adapters on the built-in engine (engine/lora.py): rows of two PEFT adapters and of the
base model decode in one batch, each row's greedy tokens equal to transformers' greedy on that
adapter merged into the base (PEFT's merge_and_unload) or on the base; adapters load on first
use and the least recently used one is evicted beyond max_loras; an unknown, unreadable,
mismatched or too-large adapter fails its own request with the reason, and the engine goes on."""

import pytest
from engine_support import PROMPTS, hf_greedy, slowed
from tiny import lora_adapter as _adapter

from aigc_ray.engine import EngineError, GenerationEngine, SamplingParams
from aigc_ray.engine.lora import AdapterError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    merged = {
        "one": _adapter(model, root / "one", 1),
        "two": _adapter(model, root / "two", 2, targets=["q_proj", "v_proj", "down_proj"]),
    }
    return {name: str(root / name) for name in merged}, merged


def test_rows_of_two_adapters_and_the_base_decode_together_each_as_its_merged_model(
    model, tokenizer, adapters
):
    paths, merged = adapters
    engine = GenerationEngine(model, tokenizer, fast=True, adapters=paths, max_loras=2)
    try:
        with engine._cv:  # every request joins the same prefill and decode steps
            reqs = [
                (name, prompt, engine.submit(prompt, GREEDY, adapter=name))
                for prompt in PROMPTS
                for name in (None, "one", "two")
            ]
        got = {(name, prompt): req.result().token_ids for name, prompt, req in reqs}
    finally:
        engine.close()
    for (name, prompt), ids in got.items():
        reference = merged[name] if name else model
        assert ids == hf_greedy(reference, tokenizer, prompt, 12), (name, prompt)
    differs = [p for p in PROMPTS if len({tuple(got[(n, p)]) for n in (None, "one", "two")}) == 3]
    assert differs, "the adapters never changed a completion"
    assert engine.bank.loads == 2


def test_adapters_load_on_first_use_and_the_least_recently_used_is_evicted(
    model, tokenizer, adapters
):
    paths, merged = adapters
    engine = GenerationEngine(model, tokenizer, fast=True, adapters=paths, max_loras=1)
    prompt = PROMPTS[1]
    try:
        assert engine.bank.loaded() == []
        for name in ("one", "two", "one"):
            ids = engine.submit(prompt, GREEDY, adapter=name).result().token_ids
            assert ids == hf_greedy(merged[name], tokenizer, prompt, 12), name
            assert engine.bank.loaded() == [name]
        assert engine.bank.loads == 3
        # the only slot held by a running request: another adapter waits for no eviction
        with slowed(engine, 0.02):
            long = engine.submit(
                prompt, SamplingParams(max_tokens=40, ignore_eos=True), adapter="one"
            )
            with pytest.raises(EngineError, match="held by running requests"):
                engine.submit(prompt, GREEDY, adapter="two")
            long.cancel()
        assert long.result(timeout=10).finish_reason == "cancelled"  # its slot held no more
        ids = engine.submit(prompt, GREEDY, adapter="two").result().token_ids
        assert ids == hf_greedy(merged["two"], tokenizer, prompt, 12)
    finally:
        engine.close()


def test_a_bad_adapter_fails_its_request_with_the_reason_and_the_engine_goes_on(
    model, tokenizer, adapters, tmp_path
):
    from transformers import LlamaConfig, LlamaForCausalLM

    paths, merged = adapters
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=model.config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    _adapter(other, tmp_path / "other-base", 3)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"not safetensors" * 9)
    bad = {
        "other-base": str(tmp_path / "other-base"),
        "corrupt": str(tmp_path / "corrupt"),
        "missing": str(tmp_path / "nowhere"),
        **paths,
    }
    engine = GenerationEngine(
        model, tokenizer, fast=True, adapters=bad, max_loras=2, max_lora_rank=4
    )
    try:
        cases = {
            "nope": "not found",
            "other-base": "trained for another base model",
            "corrupt": "cannot read",
            "missing": "is not a PEFT adapter directory",
        }
        for name, reason in cases.items():
            with pytest.raises(AdapterError, match=reason) as e:
                engine.submit(PROMPTS[0], GREEDY, adapter=name)
            assert e.value.status == (404 if name == "nope" else 400)
        small = GenerationEngine(model, tokenizer, fast=True, adapters=paths, max_lora_rank=2)
        try:
            with pytest.raises(AdapterError, match="rank 4 exceeds the configured max_lora_rank 2"):
                small.submit(PROMPTS[0], GREEDY, adapter="one")
        finally:
            small.close()
        # the engine still serves the base and the good adapters
        assert engine.submit(PROMPTS[1], GREEDY).result().token_ids == hf_greedy(
            model, tokenizer, PROMPTS[1], 12
        )
        ids = engine.submit(PROMPTS[1], GREEDY, adapter="one").result().token_ids
        assert ids == hf_greedy(merged["one"], tokenizer, PROMPTS[1], 12)
        assert engine.bank.loaded() == ["one"]
    finally:
        engine.close()


def test_adapters_need_the_slot_decoder(model, tokenizer, adapters):
    with pytest.raises(ValueError, match="LoRA adapters need the slot decoder"):
        GenerationEngine(model, tokenizer, fast=False, adapters=adapters[0])
