"""Shared unit-tier fixtures: a tiny BPE tokenizer and a tiny random-init Llama (no Ray)."""

from pathlib import Path

import pytest
from engine_support import WORDS
from tiny import stdlib_sample

from aigc_ray.config import ModelConfig

TINY_VOCAB = 400
TINY_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return stdlib_sample()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, corpus_docs) -> Path:
    from aigc_ray.model import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(iter(corpus_docs), TINY_VOCAB, out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from aigc_ray.model import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(**TINY_MODEL)


@pytest.fixture
def tiny_model(tiny_model_cfg, tiny_tokenizer):
    """A fresh (function-scoped: tests may train it) seeded tiny Llama."""
    from aigc_ray.model import build_model

    return build_model(tiny_model_cfg, tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model_cfg, tiny_tokenizer) -> Path:
    """A save_pretrained model directory (config.json + safetensors + tokenizer)."""
    from aigc_ray.model import build_model

    out = tmp_path_factory.mktemp("model")
    model = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    model.save_pretrained(str(out), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread; with 2 threads on a busy 2-core box,
    OpenMP spin-waiting turns a 0.2 s training loop into 20 s. Opt in per module."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------ the engine tests' model
# (test_engine.py and test_engine_batching.py; their shared constants are in engine_support.py)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Byte-level BPE trained on a few KB of text, saved and reloaded like a real model dir."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["slots", "transformers"])
def engine(model, tokenizer, request):
    """Every engine test runs on both paths: the slot decoder (Llama family) and transformers'
    own forward (any causal LM)."""
    from aigc_ray.engine import GenerationEngine

    eng = GenerationEngine(model, tokenizer, fast=request.param == "slots")
    assert eng.path == request.param
    yield eng
    eng.close()
