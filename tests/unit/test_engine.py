"""Unit tests for aigc_ray.engine on a tiny random-init Llama (no Ray, no downloads)."""

import re

import pytest
import torch
from engine_support import GREEDY, PROMPTS, hf_greedy, slowed

from aigc_ray.engine import ContextLengthError, GenerationEngine, InvalidParamError, SamplingParams
from aigc_ray.engine.batch import left_pad
from aigc_ray.engine.core import _pad_token_id
from aigc_ray.engine.params import resolve_device, resolve_dtype
from aigc_ray.engine.sampling import RowState, filter_logits, stable_prefix


def test_greedy_batch_matches_hf_generate_per_prompt(engine, model, tokenizer):
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # different lengths, so left padding is exercised
    results = engine.generate(PROMPTS, [GREEDY] * len(PROMPTS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == hf_greedy(model, tokenizer, prompt, GREEDY.max_tokens)
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert len({tuple(r.token_ids) for r in results}) > 1  # outputs depend on the prompt


def test_max_tokens_and_usage(engine, tokenizer):
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (1, 5, 9)]
    results = engine.generate(PROMPTS[:3], params)
    for prompt, p, result in zip(PROMPTS[:3], params, results, strict=True):
        assert result.finish_reason == "length"
        assert len(result.token_ids) == p.max_tokens == result.completion_tokens
        assert result.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert result.prompt_tokens == engine.count_tokens(prompt)


def test_chunking_by_max_batch_size_gives_same_results(model, tokenizer, engine):
    small = GenerationEngine(model, tokenizer, max_batch_size=2)
    prompts = PROMPTS + PROMPTS[:1]
    expected = engine.generate(prompts, [GREEDY] * len(prompts))
    assert small.generate(prompts, [GREEDY] * len(prompts)) == expected


def _ascii_stop(text: str) -> str:
    """A 3-letter stop string occurring in ``text`` after its first few characters."""
    match = re.search(r"[a-z]{3}", text[3:])
    assert match, f"no ascii word in greedy output {text!r}"
    return match.group(0)


def test_stop_string_truncates_text(engine):
    full = engine.generate([PROMPTS[1]], [SamplingParams(max_tokens=40, temperature=0.0)])[0]
    stop = _ascii_stop(full.text)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=["never-seen", stop])
    result = engine.generate([PROMPTS[1]], [params])[0]
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]
    assert stop not in result.text
    assert len(result.token_ids) < len(full.token_ids)
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    assert result.completion_tokens == len(result.token_ids)


def test_eos_from_generation_config_stops_like_hf(model, tokenizer):
    """EOS ends a row with finish_reason 'stop'; EOS is kept in token_ids, not in text."""
    ref = hf_greedy(model, tokenizer, PROMPTS[2], 12)
    eos = ref[4]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, eos]
    try:
        engine = GenerationEngine(model, tokenizer)
        result = engine.generate([PROMPTS[2]], [SamplingParams(max_tokens=12, temperature=0)])[0]
        assert result.token_ids == hf_greedy(model, tokenizer, PROMPTS[2], 12)
    finally:
        model.generation_config.eos_token_id = original
    assert result.finish_reason == "stop"
    assert result.token_ids == ref[: ref.index(eos) + 1]


def test_row_state_tokenizer_eos_is_skipped_in_text(tokenizer):
    row = RowState(3, SamplingParams(max_tokens=5), tokenizer, {tokenizer.eos_token_id})
    word = tokenizer("fox")["input_ids"]
    for token in [*word, tokenizer.eos_token_id, *word]:
        row.push([token])
    assert row.finish_reason == "stop"
    assert row.token_ids == [*word, tokenizer.eos_token_id]
    assert row.result().text == "fox"


def _sampled(engine, seed, prompt=PROMPTS[1], neighbours=()):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=seed)
    prompts = [*neighbours, prompt]
    others = [SamplingParams(max_tokens=5, temperature=0.7)] * len(neighbours)
    return engine.generate(prompts, [*others, params])[-1]


def test_seed_reproducible_and_seeds_differ(engine):
    first = _sampled(engine, seed=7)
    assert _sampled(engine, seed=7).token_ids == first.token_ids
    others = {tuple(_sampled(engine, seed=s).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(first.token_ids)}) > 1


def test_seeded_row_independent_of_batch_neighbours(engine):
    alone = _sampled(engine, seed=11)
    crowded = _sampled(engine, seed=11, neighbours=PROMPTS[2:])
    assert crowded.token_ids == alone.token_ids


def test_mixed_batch_keeps_greedy_row_exact(engine, model, tokenizer):
    sampled = SamplingParams(max_tokens=16, temperature=1.3, top_k=20, top_p=0.9, ignore_eos=True)
    results = engine.generate([PROMPTS[0], PROMPTS[3]], [GREEDY, sampled])
    assert results[0].token_ids == hf_greedy(model, tokenizer, PROMPTS[0], GREEDY.max_tokens)
    assert results[1].completion_tokens == 16


def test_context_length_error_names_both_numbers(engine):
    prompt = PROMPTS[3]
    n = engine.count_tokens(prompt)
    assert engine.context_window == 128
    assert engine.check_request(prompt, SamplingParams(max_tokens=128 - n)) == n
    with pytest.raises(ContextLengthError) as err:
        engine.check_request(prompt, SamplingParams(max_tokens=129 - n))
    message = str(err.value)
    assert f"{n} in the prompt" in message and f"{129 - n} max_tokens" in message
    assert "128" in message and err.value.param == "max_tokens"
    with pytest.raises(ContextLengthError):
        engine.generate([PROMPTS[0], prompt], [GREEDY, SamplingParams(max_tokens=200)])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_params_name_the_field(engine, kwargs, param):
    with pytest.raises(InvalidParamError) as err:
        engine.check_request("the", SamplingParams(**kwargs))
    assert err.value.param == param


def test_empty_prompt_rejected(engine):
    with pytest.raises(InvalidParamError, match="prompt"):
        engine.check_request("", SamplingParams())


def test_stream_deltas_join_to_generate_text(engine):
    full = engine.generate([PROMPTS[1]], [SamplingParams(max_tokens=30, temperature=0)])[0]
    stop = _ascii_stop(full.text)
    for params in (
        SamplingParams(max_tokens=30, temperature=0),
        SamplingParams(max_tokens=30, temperature=0, stop=[stop]),
    ):
        expected = engine.generate([PROMPTS[1]], [params])[0]
        stream = engine.stream(PROMPTS[1], params)
        deltas = []
        while True:
            try:
                deltas.append(next(stream))
            except StopIteration as done:
                result = done.value
                break
        assert "".join(deltas) == expected.text
        assert len(deltas) > 1
        assert result == expected


def test_stream_close_cancels(engine):
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    with slowed(engine):
        req = engine.submit(PROMPTS[0], params, stream=True)
        deltas = req.deltas()
        next(deltas)
        deltas.close()  # must not raise; decoding stops
        result = req.result(10)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 100
    assert engine.stats()["running"] == 0


def test_from_pretrained_round_trip(engine, model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = GenerationEngine.from_pretrained(str(tmp_path), device="auto", max_batch_size=4)
    assert loaded.model.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.context_window == 128 and loaded.max_batch_size == 4
    params = [GREEDY] * len(PROMPTS)
    assert loaded.generate(PROMPTS, params) == engine.generate(PROMPTS, params)


def test_pad_falls_back_to_eos(engine, tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = tokenizer.eos_token_id

    assert engine.pad_id == tokenizer.pad_token_id
    assert _pad_token_id(NoPad(), {5}) == tokenizer.eos_token_id


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = filter_logits(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top_k=2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept[2].all()  # both filters off
    assert torch.equal(out[kept], logits[kept])
    shuffled = logits[:1, [2, 0, 3, 1]]  # order-independent
    out = filter_logits(shuffled, torch.tensor([1]), torch.tensor([1.0]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]


def test_stable_prefix_holds_back_partial_stop_and_bytes():
    assert stable_prefix("hello wor", ["world"]) == "hello "
    assert stable_prefix("hello", ["xyz"]) == "hello"
    assert stable_prefix("caf\ufffd", []) == "caf"
    assert stable_prefix("ab", ["b", "abc"]) == ""


def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)


def test_left_pad_positions_start_at_first_real_token(engine):
    """RoPE is shift-invariant, so greedy parity cannot catch wrong positions; check directly
    (models with absolute position embeddings, e.g. GPT-2, depend on them)."""
    ids, mask, positions = left_pad([[5, 6, 7], [8]], engine.pad_id, engine.device)
    assert ids.tolist() == [[5, 6, 7], [engine.pad_id] * 2 + [8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_row_state_finds_stop_completed_by_multibyte_char(tokenizer):
    """A stop string ending in a multi-byte character spread over byte tokens is still found."""
    ids = tokenizer("ab\u20acx")["input_ids"]
    assert len(ids) >= 5  # the euro sign arrives as several byte-level tokens
    row = RowState(1, SamplingParams(max_tokens=20, stop=["b\u20ac"]), tokenizer, set())
    for token in ids:
        row.push([token])
    assert row.finish_reason == "stop"
    assert row.result().text == "a"
    assert row.token_ids == ids[: len(row.token_ids)] and len(row.token_ids) < len(ids)
