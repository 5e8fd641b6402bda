"""The one builder of tiny random-init models for the tests: a BPE tokenizer trained on a slice
of the embedded corpus (the running Python's standard library) and a seeded Llama saved as a
Hugging Face directory. No downloads."""

from pathlib import Path


def stdlib_texts(files: int = 40, chars: int = 5000) -> list[str]:
    """The first `chars` characters of the first `files` standard-library sources (sorted)."""
    from aigc_ray.data import stdlib_files

    return [
        Path(p).read_text(encoding="utf-8", errors="replace")[:chars]
        for p in sorted(stdlib_files())[:files]
    ]


def stdlib_sample(max_chars: int = 40_000) -> list[str]:
    """A few KB of the standard library's source, one string per non-empty file (<= 8000 chars
    each), until `max_chars` are collected."""
    from aigc_ray.data import stdlib_files

    docs, seen = [], 0
    for path in stdlib_files():
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append(text[:8000])
        seen += len(docs[-1])
        if seen >= max_chars:
            break
    return docs


def tiny_tokenizer(out: Path, vocab: int = 512, files: int = 40, chars: int = 5000):
    """A byte-level BPE tokenizer trained locally, saved under `out`; returned loaded."""
    from aigc_ray.model import train_tokenizer

    return train_tokenizer(stdlib_texts(files, chars), vocab, Path(out))


def tiny_model_dir(out: Path, tokenizer, seed: int = 0, **arch) -> str:
    """A seeded random-init Llama (`arch`: ModelConfig fields) with `tokenizer`, saved as a
    save_pretrained directory at `out`; returns its path."""
    from aigc_ray.config import ModelConfig
    from aigc_ray.model import build_model

    out = Path(out)
    build_model(ModelConfig(**arch), tokenizer, seed=seed).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)
