"""What the engine tests share (test_engine.py, test_engine_batching.py, the LoRA tests): the
prompts, the word list the tiny tokenizer is trained on, transformers' own greedy reference, a
context manager that slows decode steps, and random PEFT adapters with their merged models. Their fixtures (tokenizer, model, engine) are in conftest.py."""

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


def lora_adapter(model, path, seed: int, r: int = 4, targets=None):
    """A PEFT LoRA adapter of `model` (on every projection unless `targets`) with random A and
    B (PEFT starts B at zero: no effect), saved to `path`; returns the base with it merged."""
    import copy

    from peft import LoraConfig, get_peft_model

    targets = targets or [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    torch.manual_seed(seed)
    peft = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(str(path))
    return peft.merge_and_unload().eval()
