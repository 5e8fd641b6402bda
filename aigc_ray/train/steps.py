"""Pure training pieces (no Ray): schedule, optimizer, steps, evaluation, batches, precision."""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import torch

from aigc_ray.config import TrainConfig
from aigc_ray.errors import AigcRayError

log = logging.getLogger(__name__)


STATE_FILE = "train_state.pt"
LORA_FILE = "lora_adapter.pt"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, as PEFT saves it (in checkpoints)
METRICS_FILE = "metrics.jsonl"


class TrainError(AigcRayError, ValueError):
    """A training-stage problem found before workers start, naming the key or path."""


# ---------------------------------------------------------------- pure pieces (no Ray)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, kind: str = "cosine") -> float:
    """Linear warmup to 1, then cosine (or linear) decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)
    )


def train_step(
    model, input_ids: torch.Tensor, opt, sched, grad_clip: float, labels: torch.Tensor | None = None
) -> tuple[float, float]:
    """One optimizer step of next-token prediction; returns (loss, grad norm before clipping).

    `labels` (-100 = ignored, e.g. SFT prompt tokens) default to the inputs themselves.
    """
    return accumulate_step(model, [(input_ids, labels)], opt, sched, grad_clip)


def accumulate_step(
    model,
    micro_batches: list,
    opt,
    sched,
    grad_clip: float,
    amp_dtype: torch.dtype | None = None,
    scaler=None,
) -> tuple[float, float]:
    """One optimizer step over gradient-accumulation micro-batches [(input_ids, labels|None)].

    DDP gradients are all-reduced once, on the last micro-batch (no_sync before it); FSDP2's are
    reduce-scattered once the same way. With
    `amp_dtype` the forward runs under autocast (bf16/fp16 on GPU); `scaler` is fp16's GradScaler.
    """
    model.train()
    total = 0.0
    for i, (ids, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last
            model.set_requires_gradient_sync(last)
        ctx = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with (
            ctx,
            torch.autocast(
                ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ),
        ):
            loss = model(input_ids=ids, labels=ids if labels is None else labels).loss
            scaled = loss / len(micro_batches)
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.item()
    if scaler:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total / len(micro_batches), float(norm)


@torch.no_grad()  # not inference_mode: FSDP2 reuses its all-gather buffers in training steps
def eval_loss_sum(model, batches: list) -> tuple[float, int]:
    """Sum of per-token losses and count of predicted tokens over `batches`.

    A batch is an input_ids tensor or an (input_ids, labels) pair; labels of -100 are ignored.
    """
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
        n = int((labels[:, 1:] != -100).sum())
        if n:
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total, count


def evaluate(model, val_batches: list, device) -> float | None:
    """Mean loss per predicted token over every rank's `val_batches` (all-reduced when a
    process group is up); None without any."""
    import torch.distributed as dist

    # DDP's own forward would broadcast buffers and prepare a backward; FSDP2 must run its own
    # forward (it gathers the shards). No autograd graph either way.
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    moved = [
        tuple(t.to(device) for t in b) if isinstance(b, tuple) else b.to(device)
        for b in val_batches
    ]
    with torch.no_grad():
        total, count = eval_loss_sum(model, moved)
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else None


def to_tensor(batch: dict) -> torch.Tensor:
    """Collate a Ray Data numpy batch of `input_ids` lists into a [B, T] int64 tensor."""
    return torch.from_numpy(np.stack(batch["input_ids"]).astype(np.int64))


def collate(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels or None) tensors from a Ray Data numpy batch."""
    labels = batch.get("labels")
    return to_tensor(batch), None if labels is None else to_tensor({"input_ids": labels})


def load_val_batches(data_dir: str, rank: int, world: int, batch_size: int, n_batches: int):
    """This rank's slice of the validation blocks (small; read directly with pyarrow)."""
    import pyarrow.dataset as pads

    from aigc_ray.storage import filesystem_for

    filesystem, path = filesystem_for(f"{data_dir}/val")
    try:
        table = pads.dataset(path, format="parquet", filesystem=filesystem).to_table()
    except (FileNotFoundError, OSError):
        return []
    if "input_ids" not in table.column_names:
        return []
    # The same number of rows on every rank: FSDP ranks must run the same forward passes.
    per_rank = min(len(table) // world, batch_size * n_batches)
    cols = {
        c: table.column(c).to_numpy(zero_copy_only=False)[rank::world][:per_rank]
        for c in ("input_ids", "labels")
        if c in table.column_names
    }
    out = []
    for i in range(0, len(cols["input_ids"]), batch_size):
        ids = torch.from_numpy(np.stack(cols["input_ids"][i : i + batch_size]).astype(np.int64))
        if "labels" in cols:
            out.append(
                (
                    ids,
                    torch.from_numpy(np.stack(cols["labels"][i : i + batch_size]).astype(np.int64)),
                )
            )
        else:
            out.append(ids)
    return out


def precision(cfg: TrainConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None): mixed precision on GPU only."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None, None
    if cfg.precision == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")
