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


def tiny_text_to_image(directory: str | Path, seed: int = 0) -> None:
    """Save a tiny randomly initialized Stable Diffusion pipeline (UNet, VAE, CLIP text encoder
    and a letters-only CLIP tokenizer, all built from configs; nothing downloaded): 16x16 images,
    for smoke tests of the text-to-image path (serving, batch generation) on any machine."""
    import json
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )
    text_config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tokdir:
        Path(tokdir, "vocab.json").write_text(json.dumps(vocab))
        Path(tokdir, "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            f"{tokdir}/vocab.json",
            f"{tokdir}/merges.txt",
            model_max_length=32,
            pad_token="<|endoftext|>",
        )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(directory))


def lora_adapter(model, path, seed: int, r: int = 4, targets=None):
    """A PEFT LoRA adapter of `model` (on every projection unless `targets`) with random A and
    B (PEFT starts B at zero: no effect), saved to `path`; returns the base with it merged."""
    import copy

    import torch
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
