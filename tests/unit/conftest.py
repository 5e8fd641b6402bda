"""Shared unit-tier fixtures: a tiny BPE tokenizer and a tiny random-init Llama (no Ray)."""

from pathlib import Path

import pytest
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
