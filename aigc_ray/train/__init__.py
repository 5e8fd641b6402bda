"""Training stage: Ray Train V2 TorchTrainer with exactly-once resume. The only package that
touches ray.train.

Modules: steps (pure schedule/optimizer/step/eval pieces, no Ray), feed (exactly-once data
positions), checkpoint (model and optimizer state in and out of checkpoint dirs), loop (the
worker loop), fit (driver: preflight, TorchTrainer, export).

Every checkpoint is a Hugging Face model directory (config, safetensors, tokenizer) plus
`train_state.pt` (optimizer, scheduler, step, RNG, data position, ledger) and `metrics.jsonl`,
so any checkpoint loads with plain transformers and resumes exactly.
"""

from aigc_ray.train.checkpoint import (
    latest_complete_checkpoint,
    new_model,
    restore_model,
    save_model,
)
from aigc_ray.train.feed import check_same_order, rank_micro_batches
from aigc_ray.train.fit import (
    TrainResult,
    count_params_from_config,
    fit,
    preflight,
    worker_cpus,
)
from aigc_ray.train.loop import train_loop_per_worker
from aigc_ray.train.steps import (
    LORA_FILE,
    METRICS_FILE,
    STATE_FILE,
    TrainError,
    accumulate_step,
    build_optimizer,
    build_scheduler,
    collate,
    eval_loss_sum,
    load_val_batches,
    lr_factor,
    precision,
    to_tensor,
    train_step,
)

__all__ = [
    "LORA_FILE",
    "METRICS_FILE",
    "STATE_FILE",
    "TrainError",
    "TrainResult",
    "accumulate_step",
    "build_optimizer",
    "build_scheduler",
    "check_same_order",
    "collate",
    "count_params_from_config",
    "eval_loss_sum",
    "fit",
    "latest_complete_checkpoint",
    "load_val_batches",
    "lr_factor",
    "new_model",
    "precision",
    "preflight",
    "rank_micro_batches",
    "restore_model",
    "save_model",
    "to_tensor",
    "train_loop_per_worker",
    "train_step",
    "worker_cpus",
]
