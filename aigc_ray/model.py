"""Model and tokenizer construction. Pure torch/transformers/tokenizers: never imports Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class ModelDirError(ValueError):
    """A path given as a model directory does not hold a Hugging Face model."""


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
        raise ValueError(f"tokenizer {name_or_dir} has no eos_token; packing needs one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def is_uri(path: str | Path) -> bool:
    """True for s3:// / gs:// (any scheme://) locations, False for local paths."""
    return "://" in str(path)


def portable_location(path: str | Path) -> str:
    """`path` as any process can use it: a URI as given, a local path made absolute."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def _remote_files(uri: str) -> tuple[object, str, list]:
    """(filesystem, base path, FileInfo of every file under it) for a remote directory."""
    from pyarrow import fs

    try:
        filesystem, base = fs.FileSystem.from_uri(uri.rstrip("/"))
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise ModelDirError(f"model directory not found: {uri}") from None
    except (OSError, ValueError) as e:  # ArrowInvalid (a ValueError): unsupported URI
        raise ModelDirError(f"cannot list model directory {uri}: {e}") from None
    return filesystem, base, [i for i in infos if i.type == fs.FileType.File]


def _check_remote_model_dir(uri: str) -> None:
    filesystem, base, files = _remote_files(uri)
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


def cache_root() -> Path:
    """Where remote model directories are copied on each node ($AIGC_RAY_CACHE)."""
    return Path(os.environ.get("AIGC_RAY_CACHE", "~/.cache/aigc_ray")).expanduser() / "models"


def local_model_dir(path: str | Path) -> str:
    """A local directory holding the model (or tokenizer) directory at `path`.

    Local paths are returned resolved. An s3:// / gs:// directory is copied once per node into
    cache_root(), under a key made of the URI and the listing (names, sizes, mtimes), so a model
    re-exported to the same URI is fetched again. Processes on one node take a file lock, so
    replicas starting together fetch once; the copy lands in a temporary directory renamed into
    place, so a killed fetch never leaves a half copy that looks complete.
    """
    if not is_uri(path):
        return portable_location(path)
    import fcntl

    from pyarrow import fs

    uri = str(path).rstrip("/")
    filesystem, base, files = _remote_files(uri)
    listing = sorted((f.path, f.size, str(f.mtime)) for f in files)
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
    dest = cache_root() / key
    if dest.is_dir():  # only ever complete: it appears by rename
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        if dest.is_dir():  # another process fetched it while we waited
            return str(dest)
        tmp = dest.parent / f".{key}.partial"  # leftovers of a killed fetch are replaced
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            fs.copy_files(base, str(tmp), source_filesystem=filesystem,
                          destination_filesystem=fs.LocalFileSystem())  # fmt: skip
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s -> %s", uri, dest)
    return str(dest)


def check_export_dir(model_dir: str | Path, dest: str) -> None:
    """Refuse a local export dir that is, contains or lies inside the model dir it copies
    (exporting replaces the destination, which would delete the model)."""
    if is_uri(dest):
        return
    src, target = Path(model_dir).resolve(), Path(dest).resolve()
    if target == src or target in src.parents or src in target.parents:
        raise ModelDirError(f"train.export_dir {dest} overlaps the model directory {src}; "
                            "choose a directory outside it (or an s3:// URI)")  # fmt: skip


def copy_model_dir(local: str | Path, dest: str) -> str:
    """Copy a local model directory to `dest` (a local path or s3:// / gs://), replacing what
    was there, so no file of an earlier export (e.g. other weight shards) survives; return
    `dest`."""
    from pyarrow import fs

    src = Path(local).resolve()
    if is_uri(dest):
        filesystem, path = fs.FileSystem.from_uri(dest.rstrip("/"))
        filesystem.delete_dir_contents(path, missing_dir_ok=True)
    else:
        target = Path(dest).resolve()
        check_export_dir(src, dest)
        filesystem, path = fs.LocalFileSystem(), str(target)
        shutil.rmtree(path, ignore_errors=True)
    filesystem.create_dir(path, recursive=True)
    fs.copy_files(str(src), path, source_filesystem=fs.LocalFileSystem(),
                  destination_filesystem=filesystem)  # fmt: skip
    return dest


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
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

    return any(isinstance(m, LoraLayer) for m in _unwrap(model).modules())


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
    model = _unwrap(model)
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
