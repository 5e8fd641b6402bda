"""Unit tests for aigc_ray.model: tokenizer training, model construction, model-dir checks."""

import math
import shutil

import pytest
import torch

from aigc_ray.config import ModelConfig
from aigc_ray.model import (
    EOS_TOKEN,
    PAD_TOKEN,
    ModelDirError,
    build_model,
    check_model_dir,
    count_params,
    llama_config,
    load_tokenizer,
    train_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SNIPPET = 'def grüße(name: str) -> str:\n    """Say hi 👋"""\n\treturn f"héllo {name}"  # ✓\n'


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_round_trip(tiny_tokenizer_dir, tiny_tokenizer):
    assert (tiny_tokenizer_dir / "tokenizer.json").is_file()
    tok = tiny_tokenizer
    assert tok.eos_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) == 400  # conftest.TINY_VOCAB: the BPE reaches the requested size
    ids = tok.encode(SNIPPET, add_special_tokens=False)
    assert tok.eos_token_id not in ids
    assert tok.decode(ids) == SNIPPET


def test_tokenizer_learned_merges(tiny_tokenizer):
    # BPE merges make common code shorter than its UTF-8 bytes
    text = "def __init__(self):\n        return self\n"
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_tokenizer_any_bytes_round_trip(tiny_tokenizer):
    text = "\x00中文 \u200b ☃ 𝄞 \t\n"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_token_id is None or tiny_tokenizer.unk_token_id not in ids


def test_train_tokenizer_returns_what_it_saves(tmp_path):
    texts = ["alpha beta gamma " * 20, "beta gamma delta " * 20]
    tok = train_tokenizer(iter(texts), 300, tmp_path / "out")
    loaded = load_tokenizer(tmp_path / "out")
    s = "gamma delta alpha"
    assert loaded.encode(s) == tok.encode(s)
    assert len(loaded) == len(tok) <= 300
    assert len(tok) > 258  # 256 bytes + 2 specials + at least one merge


def test_load_tokenizer_sets_missing_pad(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == EOS_TOKEN


# ---------------------------------------------------------------- model


def expected_params(cfg: ModelConfig, vocab: int) -> int:
    h, inter = cfg.hidden_size, llama_config(cfg, vocab, 0, 1).intermediate_size
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    emb = vocab * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + emb + h


def test_build_model_config_fields(tiny_model, tiny_model_cfg, tiny_tokenizer):
    conf = tiny_model.config
    assert conf.vocab_size == len(tiny_tokenizer)
    assert conf.eos_token_id == tiny_tokenizer.eos_token_id
    assert conf.bos_token_id == tiny_tokenizer.eos_token_id
    assert conf.pad_token_id == tiny_tokenizer.pad_token_id
    assert conf.hidden_size == 32
    assert conf.num_hidden_layers == 2
    assert conf.num_attention_heads == conf.num_key_value_heads == 2
    assert conf.intermediate_size == 64  # 64 * round(8 * 32 / 3 / 64)
    assert conf.max_position_embeddings == tiny_model_cfg.max_position_embeddings
    assert conf.tie_word_embeddings is True


def test_build_model_param_count(tiny_model, tiny_model_cfg, tiny_tokenizer):
    n = count_params(tiny_model)
    assert n == expected_params(tiny_model_cfg, len(tiny_tokenizer))
    assert n == 20640 + 32 * len(tiny_tokenizer)


def test_untied_model_has_more_params(tiny_model_cfg, tiny_tokenizer, tiny_model):
    cfg = tiny_model_cfg.model_copy(update={"tie_word_embeddings": False})
    untied = build_model(cfg, tiny_tokenizer)
    assert count_params(untied) == count_params(tiny_model) + 32 * len(tiny_tokenizer)


def test_gqa_and_intermediate_override(tiny_tokenizer):
    cfg = ModelConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    m = build_model(cfg, tiny_tokenizer)
    assert m.config.num_key_value_heads == 2
    assert m.config.intermediate_size == 48
    k_proj = m.model.layers[0].self_attn.k_proj.weight
    assert k_proj.shape == (2 * 32 // 4, 32)


def test_build_model_is_seeded(tiny_model_cfg, tiny_tokenizer):
    a = build_model(tiny_model_cfg, tiny_tokenizer, seed=3)
    b = build_model(tiny_model_cfg, tiny_tokenizer, seed=3)
    c = build_model(tiny_model_cfg, tiny_tokenizer, seed=4)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_forward_logits_shape_and_initial_loss(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 16), generator=g)
    with torch.no_grad():
        out = tiny_model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 16, vocab)
    assert math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(vocab)) < 0.5


def test_build_model_from_pretrained(tiny_model_dir, tiny_tokenizer, tiny_model_cfg):
    cfg = ModelConfig(pretrained=str(tiny_model_dir), hidden_size=512, num_heads=8)
    m = build_model(cfg, tiny_tokenizer)
    assert m.config.hidden_size == tiny_model_cfg.hidden_size  # from the directory, not cfg
    ref = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    assert torch.equal(m.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert m.dtype == torch.float32


def test_build_model_bad_pretrained(tmp_path, tiny_tokenizer):
    with pytest.raises(ModelDirError):
        build_model(ModelConfig(pretrained=str(tmp_path / "nope")), tiny_tokenizer)


# ---------------------------------------------------------------- check_model_dir


def test_check_model_dir_missing(tmp_path):
    with pytest.raises(ModelDirError, match="not found") as ei:
        check_model_dir(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(ei.value)


def test_check_model_dir_file_is_not_a_dir(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    with pytest.raises(ModelDirError):
        check_model_dir(f)


def test_check_model_dir_without_config(tmp_path):
    with pytest.raises(ModelDirError, match="no config.json"):
        check_model_dir(tmp_path)


def test_check_model_dir_garbage_config(tmp_path):
    (tmp_path / "config.json").write_text("{this is not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match="not a valid model config"):
        check_model_dir(tmp_path)


def test_check_model_dir_config_without_weights(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelDirError, match="no weights"):
        check_model_dir(tmp_path)


def test_check_model_dir_ok(tiny_model_dir):
    check_model_dir(tiny_model_dir)
    check_model_dir(str(tiny_model_dir))


def test_model_dir_error_is_a_value_error():
    # the CLI maps ValueError to exit code 2
    assert issubclass(ModelDirError, ValueError)
