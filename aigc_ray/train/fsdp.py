"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for training: shard, save whole, load (no Ray).

Every transformer block (the classes a Hugging Face model lists in `_no_split_modules`) is one
FSDP unit and the root holds the rest (embeddings, final norm, a tied or untied head). Parameters
become DTensors sharded over the default process group: gloo on CPU, NCCL on GPU. On GPU the
mixed-precision policy computes in bf16/fp16 and reduces gradients in fp32; the sharded master
weights and the optimizer state stay fp32.

Checkpoints hold full (unsharded) state dicts gathered to rank 0, so a checkpoint is a plain
Hugging Face directory and resumes at any world size.
"""

from __future__ import annotations

import torch


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the model's transformer blocks (`_no_split_modules`, LoRA-wrapped too)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return names


def shard_model(
    model: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """fully_shard each block, then the root. `param_dtype` (GPU only): the compute dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"train.strategy=fsdp: {type(model).__name__} lists no transformer block classes "
            "(_no_split_modules); use train.strategy=ddp"
        )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_state(model, opt) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on rank 0's CPU, empty elsewhere; every rank calls it
    (it is a collective). The optimizer's is keyed by parameter name, as set_optimizer loads."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, opt, options=options),
    )


def load_optimizer(model, opt, saved: dict) -> None:
    """Load a full optimizer state dict (every rank holds it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, opt, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True)
    )


def plain_model(model, state_dict: dict):
    """An unsharded model of the same config over `state_dict` (no copy of the tensors): what
    save_pretrained writes, with the architecture's own class name (fully_shard renamed the
    sharded model's class to FSDP<name>)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state_dict, assign=True, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"FSDP full state dict lacks {missing[:3]}")
    return plain
