"""The benchmarks' model: the guide's tiny Llama (8 layers x 512, vocab 8192, random init) with a
byte-level BPE trained locally on stdlib source, saved as a Hugging Face model directory.
Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

PROMPT_FILES = 60  # stdlib files the tokenizer is trained on (enough for 8192 merges)


def stdlib_texts(limit: int = PROMPT_FILES) -> list[str]:
    from aigc_ray.data.readers import stdlib_files

    texts = []
    for path in sorted(stdlib_files())[:limit]:
        texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    return texts


def make_model_dir(
    out_dir: str | Path, vocab_size: int = 8192, layers: int = 8, hidden: int = 512
) -> str:
    """Build (once) and save the tiny model + tokenizer under ``out_dir``; return its path."""
    from aigc_ray.config import ModelConfig
    from aigc_ray.model import build_model, train_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return str(out)
    tokenizer = train_tokenizer(stdlib_texts(), vocab_size, out)
    cfg = ModelConfig(
        hidden_size=hidden, num_layers=layers, num_heads=8, max_position_embeddings=1024
    )
    model = build_model(cfg, tokenizer, seed=0)
    model.save_pretrained(str(out))
    return str(out)


def bench_prompts(tokenizer, n: int, prompt_tokens: int) -> list[str]:
    """``n`` distinct stdlib snippets of exactly ``prompt_tokens`` tokens each."""
    ids = tokenizer("\n".join(stdlib_texts(20)), add_special_tokens=False)["input_ids"]
    prompts = []
    for i in range(n):
        start = i * 97 % (len(ids) - prompt_tokens)
        text = tokenizer.decode(ids[start : start + prompt_tokens])
        prompts.append(text)
    return prompts
