"""Model and tokenizer construction. Pure torch/transformers/tokenizers: never imports Ray."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from aigc_ray.config import ModelConfig
from aigc_ray.errors import ModelDirError
from aigc_ray.storage import (  # noqa: F401 - re-exported: model dirs are used through here
    cache_root,
    check_export_dir,
    copy_model_dir,
    is_uri,
    local_model_dir,
    portable_location,
    remote_files,
)

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def perplexity(loss: float | None) -> float | None:
    """exp(mean token loss), capped at exp(50) so an untrained model's loss stays printable."""
    import math

    return None if loss is None else math.exp(min(loss, 50))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it in Hugging Face format to `out_dir`.

    EOS (also used as BOS) and PAD are special tokens; every byte is representable, so no
    input is ever out of vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    hf.model_max_length = 1 << 30
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    log.info("trained BPE tokenizer: %d tokens -> %s", len(hf), out_dir)
    return hf


def load_tokenizer(name_or_dir: str | Path):
    """Load any Hugging Face tokenizer (directory or hub id); ensure it has EOS and PAD."""
    tok = AutoTokenizer.from_pretrained(str(name_or_dir))
    if tok.eos_token is None:
        raise ModelDirError(f"tokenizer {name_or_dir} has no eos_token; packing needs one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_remote_model_dir(uri: str) -> None:
    filesystem, base, files = remote_files(uri)
    names = {f.path[len(base) :].lstrip("/") for f in files}
    if not names:
        raise ModelDirError(f"model directory not found (or empty): {uri}")
    if "config.json" not in names:
        raise ModelDirError(f"{uri} is not a Hugging Face model directory (no config.json)")
    with filesystem.open_input_stream(f"{base}/config.json") as fh:
        try:
            json.loads(fh.read())
        except ValueError as e:
            raise ModelDirError(f"{uri}/config.json is not valid JSON: {e}") from None
    if not any(n.endswith((".safetensors", ".bin")) and "/" not in n for n in names):
        raise ModelDirError(f"{uri} has a config.json but no weights (*.safetensors or *.bin)")


def check_model_dir(path: str | Path) -> None:
    """Raise ModelDirError unless `path` (local, or s3:// / gs://) holds a Hugging Face
    causal-LM directory: a valid config.json and weights."""
    if is_uri(path):
        return _check_remote_model_dir(str(path))
    p = Path(path)
    if not p.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    if not (p / "config.json").is_file():
        raise ModelDirError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        AutoConfig.from_pretrained(str(p))
    except Exception as e:  # transformers raises several types for a bad config
        raise ModelDirError(f"{path}/config.json is not a valid model config: {e}") from e
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin"))
    if not weights:
        raise ModelDirError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")


def llama_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int) -> LlamaConfig:
    """The LlamaConfig for a from-scratch model described by `cfg`."""
    inter = cfg.intermediate_size or 64 * round(8 * cfg.hidden_size / 3 / 64)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A causal LM: loaded from `cfg.pretrained`, or a new Llama with seeded random init."""
    if cfg.pretrained:
        check_model_dir(cfg.pretrained)
        local = local_model_dir(cfg.pretrained)  # s3:// -> this node's cache
        return AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    torch.manual_seed(seed)
    conf = llama_config(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    return LlamaForCausalLM(conf)


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# LoRA (peft is an optional extra: `pip install aigc_ray[lora]`; imported only inside functions).

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DataParallel / DistributedDataParallel wrappers (as made by Ray Train)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def is_lora(model: torch.nn.Module) -> bool:
    """True if `model` (or the model inside a DDP wrapper) holds peft LoRA layers."""
    import sys

    if "peft" not in sys.modules:  # nothing can hold peft layers; avoid a slow import
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in unwrap_ddp(model).modules())


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters with requires_grad (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_lora(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> torch.nn.Module:
    """Wrap a causal LM in a peft LoRA model; only the adapters stay trainable.

    `model` is modified in place (adapter layers are injected, base weights frozen) and the
    returned PeftModel must be used from then on. Adapters start as a no-op (B = 0), so the
    wrapped model initially computes exactly what `model` did. `target_modules` defaults to
    the Llama attention and MLP projections present in the model (peft's per-architecture
    default if none are). Embeddings and lm_head are never targeted by default, so tied
    embeddings stay tied and frozen.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if is_lora(model):
        raise ValueError("model already has LoRA adapters; merge_lora it before applying again")
    if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"bad LoRA settings: need r >= 1, alpha > 0, 0 <= dropout < 1; "
            f"got r={r}, alpha={alpha}, dropout={dropout}"
        )
    if target_modules is None:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        target_modules = [t for t in LLAMA_LORA_TARGETS if t in names] or None
    total = sum(p.numel() for p in model.parameters())
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    trainable = trainable_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%s dropout=%s on %s: %d trainable of %d parameters (%.2f%%)",
        r,
        alpha,
        dropout,
        sorted(peft_model.peft_config["default"].target_modules),
        trainable,
        total + trainable,
        100.0 * trainable / (total + trainable),
    )
    return peft_model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with the LoRA deltas merged into its base weights.

    `model` is consumed (its base layers are rewritten in place). The result has no peft
    modules, all parameters trainable again, and save_pretrained writes a normal model that
    AutoModelForCausalLM loads without peft. A model without LoRA is returned unwrapped as is.
    """
    model = unwrap_ddp(model)
    if not is_lora(model):
        return model
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"LoRA layers found in a {type(model).__name__}, not a PeftModel; "
            "use apply_lora to add adapters"
        )
    merged = model.merge_and_unload(progressbar=False, safe_merge=True)
    merged.requires_grad_(True)
    return merged
