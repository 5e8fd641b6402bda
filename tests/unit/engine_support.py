"""What the engine tests share (test_engine.py, test_engine_batching.py, the LoRA tests): the
prompts, the word list the tiny tokenizer is trained on, transformers' own greedy reference, and
a context manager that slows decode steps. Their fixtures (tokenizer, model, engine) are in
conftest.py; random PEFT adapters are tiny.lora_adapter."""

import contextlib
import time

import torch

from aigc_ray.engine import SamplingParams

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "ray",
    "serves",
    "tokens",
    "from",
    "cache",
]
PROMPTS = [
    "the",
    "the quick brown fox jumps over a lazy dog",
    "ray serves",
    "tokens from cache while the dog jumps over the fox and ray serves",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference: transformers' own greedy generate on the prompt alone (no padding)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@contextlib.contextmanager
def slowed(eng, seconds: float = 0.005):
    """Each decode step takes at least ``seconds``: a tiny model on the slot path finishes 100
    tokens in milliseconds, before a test could cancel it."""
    real = eng.runner.decode

    def slow():
        time.sleep(seconds)
        return real()

    eng.runner.decode = slow
    try:
        yield eng
    finally:
        eng.runner.decode = real
