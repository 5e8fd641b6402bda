"""Model and optimizer state in and out of checkpoint directories (LoRA, FSDP aware)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from aigc_ray.config import ModelConfig
from aigc_ray.train.steps import ADAPTER_DIR, LORA_FILE, STATE_FILE

log = logging.getLogger(__name__)


def save_model(model, tok, directory: str, state_dict: dict | None = None) -> None:
    """A plain Hugging Face model directory; a LoRA model is saved merged, plus its adapter
    weights (LORA_FILE) so training can resume with the adapters separate, and the adapter as
    a PEFT adapter directory (ADAPTER_DIR)."""
    from aigc_ray.model import is_lora, merge_lora
    from aigc_ray.train.fsdp import is_fsdp, plain_model

    unwrapped = getattr(model, "module", model)
    if is_fsdp(unwrapped):
        unwrapped, state_dict = plain_model(unwrapped, state_dict), None
    if is_lora(unwrapped):
        from peft import get_peft_model_state_dict

        torch.save(get_peft_model_state_dict(unwrapped), os.path.join(directory, LORA_FILE))
        # the adapter as PEFT saves it (adapter_config.json, adapter_model.safetensors): what
        # PeftModel.from_pretrained and vLLM's LoRA support load over the base
        unwrapped.save_pretrained(os.path.join(directory, ADAPTER_DIR))
        unwrapped = merge_lora(copy.deepcopy(unwrapped))
    unwrapped.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(directory)


def new_model(model_cfg: ModelConfig, tok, seed: int):
    """The model a run starts from: built (or loaded) per ModelConfig, LoRA-wrapped if asked."""
    from aigc_ray.model import apply_lora, build_model

    model = build_model(model_cfg, tok, seed=seed)
    if model_cfg.lora_r:
        model = apply_lora(
            model,
            model_cfg.lora_r,
            model_cfg.lora_alpha,
            model_cfg.lora_dropout,
            model_cfg.lora_targets,
        )
    return model


def restore_model(model_cfg: ModelConfig, tok, seed: int, directory: str):
    """The model of a checkpoint directory: adapters over the same base for LoRA runs."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(directory, LORA_FILE)):
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    from peft import set_peft_model_state_dict

    model = new_model(model_cfg, tok, seed)
    set_peft_model_state_dict(model, torch.load(os.path.join(directory, LORA_FILE)))
    return model


def _gather_for_save(model, opt) -> tuple[dict | None, dict]:
    """FSDP: full model and optimizer state dicts gathered to rank 0 (a collective: every rank
    calls it). DDP/single: (None, opt.state_dict()) and the model saves itself."""
    from aigc_ray.train.fsdp import full_state, is_fsdp

    if not is_fsdp(model):
        return None, opt.state_dict()
    return full_state(model, opt)


def _load_optimizer(model, opt, saved: dict) -> None:
    from aigc_ray.train.fsdp import is_fsdp, load_optimizer

    if is_fsdp(model):
        load_optimizer(model, opt, saved)
    else:
        opt.load_state_dict(saved)


def latest_complete_checkpoint(run_storage: Path) -> str | None:
    """The newest checkpoint directory whose files are all there and readable (for error
    messages): a worker killed while a checkpoint was being persisted leaves a directory with
    truncated files, which must not be named as the one to resume from."""
    done = [d for d in run_storage.glob("checkpoint_*") if _readable_checkpoint(d)]
    return str(max(done, key=lambda d: d.name)) if done else None


def _readable_checkpoint(d: Path) -> bool:
    import json

    from safetensors import safe_open

    try:
        json.loads((d / "config.json").read_text())
        weights = sorted(d.glob("*.safetensors"))
        for path in weights:
            with safe_open(str(path), "pt") as f:
                f.keys()
        return bool(weights) and (d / STATE_FILE).stat().st_size > 0
    except (OSError, ValueError, RuntimeError):
        return False
