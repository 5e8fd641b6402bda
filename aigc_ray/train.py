"""Training stage: pure step functions + the Ray Train V2 TorchTrainer loop + `fit`.

The only module that touches ray.train. Every checkpoint is a Hugging Face model directory
(config, safetensors, tokenizer) plus `train_state.pt` (optimizer, scheduler, step, RNG) and
`metrics.jsonl`, so any checkpoint loads with plain transformers and resumes exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aigc_ray.config import ModelConfig, TrainConfig, write_resolved

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


class TrainError(ValueError):
    """A training-stage problem found before workers start, naming the key or path."""


# ---------------------------------------------------------------- pure pieces (no Ray)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )


def train_step(model, input_ids: torch.Tensor, opt, sched, grad_clip: float,
               labels: torch.Tensor | None = None) -> tuple[float, float]:  # fmt: skip
    """One optimizer step of next-token prediction; returns (loss, grad norm before clipping).

    `labels` (-100 = ignored, e.g. SFT prompt tokens) default to the inputs themselves.
    """
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids if labels is None else labels).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), float(norm)


@torch.inference_mode()
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

    from aigc_ray.data.readers import filesystem_for

    filesystem, path = filesystem_for(f"{data_dir}/val")
    try:
        table = pads.dataset(path, format="parquet", filesystem=filesystem).to_table()
    except (FileNotFoundError, OSError):
        return []
    if "input_ids" not in table.column_names:
        return []
    cols = {c: table.column(c).to_numpy(zero_copy_only=False)[rank::world][: batch_size * n_batches]
            for c in ("input_ids", "labels") if c in table.column_names}  # fmt: skip
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


# ---------------------------------------------------------------- the worker loop


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    history: list | None = None


def _all_mean(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _eval(model, val_batches, device) -> float | None:
    import torch.distributed as dist

    moved = [
        tuple(t.to(device) for t in b) if isinstance(b, tuple) else b.to(device)
        for b in val_batches
    ]
    total, count = eval_loss_sum(model, moved)
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else None


def _save_checkpoint(model, tok, opt, sched, state: _State, directory: str) -> None:
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": state.step, "tokens": state.tokens,
                "rng": torch.get_rng_state()}, os.path.join(directory, STATE_FILE))  # fmt: skip
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state.history)


def _report(metrics: dict, model, tok, opt, sched, state: _State, with_checkpoint: bool) -> None:
    """Every rank calls this the same number of times; rank 0 attaches the checkpoint."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        _save_checkpoint(model, tok, opt, sched, state, d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore(cfg: dict, tok):
    """Model and state from the latest checkpoint, or a fresh model."""
    import ray.train
    from transformers import AutoModelForCausalLM

    from aigc_ray.model import build_model

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return build_model(ModelConfig(**cfg["model"]), tok, seed=cfg["train"]["seed"]), None
    with ckpt.as_directory() as d:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        saved = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
        with open(os.path.join(d, METRICS_FILE)) as f:
            saved["history"] = [json.loads(line) for line in f]
    return model, saved


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` holds small dicts only: train, model, data_dir, tokenizer_dir."""
    import ray.train
    import ray.train.torch

    from aigc_ray.model import load_tokenizer

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    tok = load_tokenizer(config["tokenizer_dir"])
    model, saved = _restore(config, tok)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    state = _State(history=[])
    if saved:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = _State(saved["step"], saved["tokens"], saved["history"])
        log.info("rank %d resumed at step %d", rank, state.step)
    val = load_val_batches(config["data_dir"], rank, world, cfg.batch_size, cfg.eval_batches)
    if state.step == 0:
        state.history.append({"step": 0, "val_loss": _eval(model, val, device)})
    _run_steps(cfg, model, tok, opt, sched, state, val, device, world)


def _run_steps(cfg: TrainConfig, model, tok, opt, sched, state: _State, val, device, world) -> None:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    t_log, tok_log, window = time.time(), state.tokens, []
    while state.step < cfg.max_steps:
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=collate,
                                           drop_last=True, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                           local_shuffle_seed=cfg.seed + state.step)  # fmt: skip
        for ids, labels in batches:
            labels = None if labels is None else labels.to(device)
            loss, norm = train_step(model, ids.to(device), opt, sched, cfg.grad_clip, labels)
            state.step += 1
            state.tokens += ids.numel() * world
            window.append((loss, norm))
            last = state.step >= cfg.max_steps
            do_eval = last or state.step % cfg.eval_every == 0
            do_ckpt = last or state.step % cfg.checkpoint_every == 0
            if last or do_eval or do_ckpt or state.step % 10 == 0:
                loss_avg, norm_avg = _all_mean([np.mean([w[0] for w in window]),
                                                np.mean([w[1] for w in window])], device)  # fmt: skip
                dt = time.time() - t_log
                row = {"step": state.step, "loss": round(loss_avg, 4), "lr": sched.get_last_lr()[0],
                       "grad_norm": round(norm_avg, 4),
                       "tokens_per_s": round((state.tokens - tok_log) / max(dt, 1e-9), 1),
                       "tokens": state.tokens}  # fmt: skip
                if do_eval:
                    row["val_loss"] = _eval(model, val, device)
                state.history.append(row)
                t_log, tok_log, window = time.time(), state.tokens, []
            if do_eval or do_ckpt:
                _report(state.history[-1], model, tok, opt, sched, state, with_checkpoint=do_ckpt)
            if last:
                return


# ---------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    model_dir: str
    run_dir: str
    steps: int
    tokens: int
    first_loss: float
    last_loss: float
    val_loss_initial: float | None
    val_loss_final: float | None
    seconds: float
    params: int

    def as_dict(self) -> dict:
        return asdict(self)


def preflight(cfg: TrainConfig, model_cfg: ModelConfig, data_dir: str) -> dict:
    """Check everything checkable before any worker starts; return the data manifest."""
    from aigc_ray.data import DataError, read_manifest
    from aigc_ray.model import check_model_dir

    if model_cfg.pretrained:
        check_model_dir(model_cfg.pretrained)
    try:
        manifest = read_manifest(data_dir)
    except DataError as e:
        raise TrainError(f"train.data_dir: {e}") from None
    missing = [k for k in ("seq_len", "splits", "tokenizer_dir") if k not in manifest]
    if missing:
        raise TrainError(f"{data_dir}/manifest.json lacks {missing}: re-run `aigc-ray preprocess`")
    if manifest["seq_len"] != cfg.seq_len:
        raise TrainError(f"train.seq_len ({cfg.seq_len}) must equal the shards' seq_len "
                         f"({manifest['seq_len']}) in {data_dir}/manifest.json")  # fmt: skip
    blocks = manifest["splits"]["train"]["blocks"]
    if blocks < cfg.batch_size * cfg.num_workers:
        raise TrainError(f"train.batch_size ({cfg.batch_size}) x train.num_workers ({cfg.num_workers}) "
                         f"exceeds the {blocks} training blocks in {data_dir}")  # fmt: skip
    return manifest


def _local_dir(uri: str) -> str:
    """A local copy of a small directory (the tokenizer) that may live in object storage."""
    if "://" not in uri:
        return str(Path(uri).resolve())
    import tempfile

    from pyarrow import fs as pafs

    from aigc_ray.data.readers import filesystem_for

    filesystem, path = filesystem_for(uri)
    local = tempfile.mkdtemp(prefix="aigc_tok_")
    pafs.copy_files(path, local, source_filesystem=filesystem)
    return local


def _plot_loss(history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def worker_cpus(cfg: TrainConfig, cluster_cpus: float) -> float:
    """CPUs to reserve per worker so that Ray Data's read tasks keep at least one CPU.

    Ray Train takes the workers' CPUs out of Ray Data's budget; on a small box (2 workers x
    1 CPU on 2 cores) the ingest would get none and the run would hang. GPU runs keep the config.
    """
    need = cfg.num_workers * cfg.cpus_per_worker
    if cfg.use_gpu or cluster_cpus - need >= 1:
        return cfg.cpus_per_worker
    fitted = max(0.1, round((cluster_cpus - 1) / cfg.num_workers, 2))
    log.warning("train.cpus_per_worker %.2f -> %.2f so data ingest keeps 1 of %g CPUs",
                cfg.cpus_per_worker, fitted, cluster_cpus)  # fmt: skip
    return fitted


def fit(cfg: TrainConfig, model_cfg: ModelConfig, data_dir: str) -> TrainResult:
    """Train with a TorchTrainer; export the final model to `run_dir/model`; write metrics."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = preflight(cfg, model_cfg, data_dir)
    t0 = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    storage = cfg.storage_path or str(run_dir / "ray")
    cpus = worker_cpus(cfg, ray.cluster_resources().get("CPU", 0))
    ray.data.DataContext.get_current().enable_progress_bars = False
    data_dir = data_dir if "://" in data_dir else str(Path(data_dir).resolve())
    columns = ["input_ids", "labels"] if manifest.get("format") == "sft" else ["input_ids"]
    # Shards are written in corpus order; without shuffling, the first steps would see one
    # corner of the corpus only (e.g. all of encodings/*.py). Both shuffles are seeded.
    train_ds = ray.data.read_parquet(f"{data_dir}/train", columns=columns).randomize_block_order(
        seed=cfg.seed
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(),
            "model": model_cfg.model_dump(),
            "data_dir": data_dir,
            "tokenizer_dir": _local_dir(manifest["tokenizer_dir"]),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus}
        ),  # fmt: skip
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),  # fmt: skip
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    return _export(result.checkpoint, run_dir, cfg, model_cfg, time.time() - t0)


def _export(checkpoint, run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, secs: float):
    model_dir = run_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    checkpoint.to_directory(str(model_dir))
    history = [json.loads(line) for line in (model_dir / METRICS_FILE).read_text().splitlines()]
    (model_dir / STATE_FILE).unlink()
    shutil.move(str(model_dir / METRICS_FILE), run_dir / METRICS_FILE)
    _plot_loss(history, run_dir / "loss.png")
    write_resolved(cfg, run_dir, "train_config.resolved.json")
    write_resolved(model_cfg, run_dir, "model_config.resolved.json")
    losses = [r["loss"] for r in history if "loss" in r]
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    from transformers import AutoConfig

    n_params = count_params_from_config(AutoConfig.from_pretrained(str(model_dir)))
    return TrainResult(str(model_dir), str(run_dir), history[-1]["step"], history[-1].get("tokens", 0),
                       losses[0], losses[-1], vals[0] if vals else None,
                       vals[-1] if len(vals) > 1 else None, round(secs, 1), n_params)  # fmt: skip


def count_params_from_config(conf) -> int:
    """Parameter count of a model config, without allocating weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return sum(p.numel() for p in model.parameters())
