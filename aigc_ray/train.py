"""Training stage: pure step functions + the Ray Train V2 TorchTrainer loop + `fit`.

The only module that touches ray.train. Every checkpoint is a Hugging Face model directory
(config, safetensors, tokenizer) plus `train_state.pt` (optimizer, scheduler, step, RNG) and
`metrics.jsonl`, so any checkpoint loads with plain transformers and resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from aigc_ray.config import ModelConfig, TrainConfig, write_resolved

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LORA_FILE = "lora_adapter.pt"
METRICS_FILE = "metrics.jsonl"


class TrainError(ValueError):
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
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)
    )


def train_step(model, input_ids: torch.Tensor, opt, sched, grad_clip: float,
               labels: torch.Tensor | None = None) -> tuple[float, float]:  # fmt: skip
    """One optimizer step of next-token prediction; returns (loss, grad norm before clipping).

    `labels` (-100 = ignored, e.g. SFT prompt tokens) default to the inputs themselves.
    """
    return accumulate_step(model, [(input_ids, labels)], opt, sched, grad_clip)


def accumulate_step(model, micro_batches: list, opt, sched, grad_clip: float,
                    amp_dtype: torch.dtype | None = None, scaler=None) -> tuple[float, float]:  # fmt: skip
    """One optimizer step over gradient-accumulation micro-batches [(input_ids, labels|None)].

    DDP gradients are all-reduced once, on the last micro-batch (no_sync before it). With
    `amp_dtype` the forward runs under autocast (bf16/fp16 on GPU); `scaler` is fp16's GradScaler.
    """
    model.train()
    total = 0.0
    for i, (ids, labels) in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not hasattr(model, "no_sync")
        ctx = contextlib.nullcontext() if sync else model.no_sync()
        with ctx, torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32,
                                 enabled=amp_dtype is not None):  # fmt: skip
            loss = model(input_ids=ids, labels=ids if labels is None else labels).loss
            scaled = loss / len(micro_batches)
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.item()
    if scaler:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total / len(micro_batches), float(norm)


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
    ledger: list | None = None  # committed (epoch, position) pairs, all ranks, in checkpoints
    epoch: int = 0
    epoch_pos: int = 0  # next unconsumed position of the epoch (independent of world size)
    pending: list = field(default_factory=list)  # this rank's pairs since the last checkpoint


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


def save_model(model, tok, directory: str, state_dict: dict | None = None) -> None:
    """A plain Hugging Face model directory; a LoRA model is saved merged, plus its adapter
    weights (LORA_FILE) so training can resume with the adapters separate."""
    from aigc_ray.model import is_lora, merge_lora

    unwrapped = getattr(model, "module", model)
    if is_lora(unwrapped):
        from peft import get_peft_model_state_dict

        torch.save(get_peft_model_state_dict(unwrapped), os.path.join(directory, LORA_FILE))
        unwrapped = merge_lora(copy.deepcopy(unwrapped))
    unwrapped.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(directory)


def new_model(model_cfg: ModelConfig, tok, seed: int):
    """The model a run starts from: built (or loaded) per ModelConfig, LoRA-wrapped if asked."""
    from aigc_ray.model import apply_lora, build_model

    model = build_model(model_cfg, tok, seed=seed)
    if model_cfg.lora_r:
        model = apply_lora(model, model_cfg.lora_r, model_cfg.lora_alpha, model_cfg.lora_dropout,
                           model_cfg.lora_targets)  # fmt: skip
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


def _save_checkpoint(
    model, tok, opt_state: dict, model_state, sched, state: _State, directory: str
) -> None:
    save_model(model, tok, directory, model_state)
    torch.save({"optimizer": opt_state, "scheduler": sched.state_dict(),
                "step": state.step, "tokens": state.tokens, "ledger": state.ledger,
                "epoch": state.epoch, "epoch_pos": state.epoch_pos,
                "rng": torch.get_rng_state()}, os.path.join(directory, STATE_FILE))  # fmt: skip
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state.history)


def _report(metrics: dict, model, tok, opt, sched, state: _State, with_checkpoint: bool) -> None:
    """Every rank calls this the same number of times; rank 0 attaches the checkpoint."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    model_state, opt_state = _gather_for_save(model, opt) if with_checkpoint else (None, None)
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        _save_checkpoint(model, tok, opt_state, model_state, sched, state, d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore(cfg: dict, tok):
    """Model and state from the latest checkpoint, or a fresh model."""
    import ray.train

    model_cfg, seed = ModelConfig(**cfg["model"]), cfg["train"]["seed"]
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return new_model(model_cfg, tok, seed), None
    with ckpt.as_directory() as d:
        model = restore_model(model_cfg, tok, seed, d)
        saved = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
        with open(os.path.join(d, METRICS_FILE)) as f:
            saved["history"] = [json.loads(line) for line in f]
    return model, saved


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` holds small values only: train, model, data_dir,
    tokenizer_dir, train_rows."""
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
    model = _prepare(model, cfg)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    state = _State(history=[], ledger=[])
    if saved:
        _load_optimizer(model, opt, saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = _State(saved["step"], saved["tokens"], saved["history"], saved.get("ledger", []),
                       saved.get("epoch", 0), saved.get("epoch_pos", 0))  # fmt: skip
        log.info("rank %d resumed at step %d", rank, state.step)
    val = load_val_batches(config["data_dir"], rank, world, cfg.batch_size, cfg.eval_batches)
    if state.step == 0:
        state.history.append({"step": 0, "val_loss": _eval(model, val, device)})
    feed = _Feed(cfg, rank, world, config["train_rows"])
    _run_steps(cfg, model, tok, opt, sched, state, val, device, feed)


def _prepare(model, cfg: TrainConfig):
    import ray.train.torch

    # use_orig_params keeps per-parameter requires_grad (LoRA) and the decay groups under FSDP
    kwargs = {"use_orig_params": True} if cfg.strategy == "fsdp" else {}
    return ray.train.torch.prepare_model(model, parallel_strategy=cfg.strategy,
                                         parallel_strategy_kwargs=kwargs)  # fmt: skip


def _gather_for_save(model, opt) -> tuple[dict | None, dict]:
    """FSDP: full model and optimizer state dicts gathered to rank 0 (a collective: every rank
    calls it). DDP/single: (None, opt.state_dict()) and the model saves itself."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(model, FSDP):
        return None, opt.state_dict()
    full = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, full):
        return model.state_dict(), FSDP.optim_state_dict(model, opt)


def _load_optimizer(model, opt, saved: dict) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        saved = FSDP.optim_state_dict_to_load(model, opt, saved)
    opt.load_state_dict(saved)


def precision(cfg: TrainConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None): mixed precision on GPU only."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None, None
    if cfg.precision == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


class _Feed:
    """Exactly-once data positions. Every rank iterates the same seeded epoch order; global
    position p belongs to rank p % world; a resumed run skips the positions its checkpointed
    steps consumed, so no sample is skipped or repeated within an epoch. The epoch's last
    partial global batch (< batch_size x grad_accum x world rows) is not used."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, rows: int):
        self.cfg, self.rank, self.world, self.rows = cfg, rank, world, rows
        self.per_step = cfg.batch_size * cfg.grad_accum * world
        if rows < self.per_step:
            raise TrainError(f"{rows} training rows cannot fill one step of {self.per_step}")

    def steps(self, shard, epoch: int, start: int):
        """Yield (epoch, positions, micro_batches) per optimizer step, from epoch position
        `start` to the epoch's end. Positions, not step counts, mark progress, so a resume
        with a different number of workers (elastic) still consumes each sample once."""
        limit = start + (self.rows - start) // self.per_step * self.per_step
        stream = shard.iter_batches(batch_size=1024, batch_format="numpy",
                                    local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
                                    local_shuffle_seed=self.cfg.seed + epoch)  # fmt: skip
        self.probe: list[int] = []
        micro = rank_micro_batches(stream, self.rank, self.world, start, limit,
                                   self.cfg.batch_size, self.probe)  # fmt: skip
        group: list = []
        for item in micro:
            group.append(item)
            if len(group) == self.cfg.grad_accum:
                positions = np.concatenate([g[0] for g in group])
                yield epoch, positions, [(g[1], g[2]) for g in group]
                group = []


def rank_micro_batches(stream, rank: int, world: int, start: int, limit: int, batch_size: int,
                       probe: list | None = None):  # fmt: skip
    """(positions, input_ids [B,T], labels [B,T] | None) micro-batches of one rank.

    Position p of the epoch stream goes to rank p % world; p < start (already consumed) and
    p >= limit (the epoch's partial last global batch) are skipped. `probe` receives a digest
    of the epoch's first rows (the same on every rank when orders agree).
    """
    pos, buf = 0, []
    for batch in stream:
        ids, labels = batch["input_ids"], batch.get("labels")
        if pos == 0 and probe is not None:
            head = np.concatenate([np.asarray(r, np.int64) for r in ids[:16]])
            probe.append(int(zlib.crc32(head.tobytes())))
        n = len(ids)
        positions = np.arange(pos, pos + n)
        mine = np.flatnonzero(
            (positions % world == rank) & (positions >= start) & (positions < limit)
        )
        for i in mine:
            buf.append((positions[i], ids[i], None if labels is None else labels[i]))
            if len(buf) == batch_size:
                yield _stack(buf)
                buf = []
        pos += n
        if pos >= limit:
            return


def _stack(buf: list):
    positions = np.array([b[0] for b in buf], np.int64)
    ids = torch.from_numpy(np.stack([b[1] for b in buf]).astype(np.int64))
    labels = (
        None
        if buf[0][2] is None
        else torch.from_numpy(np.stack([b[2] for b in buf]).astype(np.int64))
    )
    return positions, ids, labels


def check_same_order(digest: int, device) -> None:
    """Fail loudly if ranks see different epoch orders (exactly-once relies on it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if len({int(t) for t in everyone}) != 1:
        raise RuntimeError("training ranks see different data orders; exactly-once needs a "
                           "deterministic order (preserve_order) on every rank")  # fmt: skip


def _commit_ledger(state: _State) -> None:
    """Merge every rank's newly consumed positions into the committed ledger (all ranks)."""
    import torch.distributed as dist

    new = state.pending
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, new)
        new = [x for part in gathered for x in part]
    state.ledger += sorted(new)
    state.pending = []


def _run_steps(
    cfg: TrainConfig, model, tok, opt, sched, state: _State, val, device, feed: _Feed
) -> None:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    amp, scaler = precision(cfg, device)
    t_log, tok_log, window = time.time(), state.tokens, []
    while state.step < cfg.max_steps:
        for n, (epoch, positions, micro) in enumerate(
            feed.steps(shard, state.epoch, state.epoch_pos)
        ):
            if n == 0:
                check_same_order(feed.probe[0], device)
            micro = [(i.to(device), None if lab is None else lab.to(device)) for i, lab in micro]
            loss, norm = accumulate_step(model, micro, opt, sched, cfg.grad_clip, amp, scaler)
            state.step += 1
            state.epoch_pos += feed.per_step
            state.tokens += sum(i.numel() for i, _ in micro) * feed.world
            if cfg.ledger:
                state.pending += [(epoch, int(p)) for p in positions]
            window.append((loss, norm))
            if _after_step(cfg, model, tok, opt, sched, state, val, device, window, t_log, tok_log):
                t_log, tok_log, window = time.time(), state.tokens, []
            if state.step >= cfg.max_steps:
                return
        state.epoch, state.epoch_pos = state.epoch + 1, 0


def _after_step(
    cfg, model, tok, opt, sched, state: _State, val, device, window, t_log, tok_log
) -> bool:
    """Log every 10 steps, evaluate and checkpoint on schedule; True when a row was logged."""
    last = state.step >= cfg.max_steps
    do_eval = last or state.step % cfg.eval_every == 0
    do_ckpt = last or state.step % cfg.checkpoint_every == 0
    if not (do_eval or do_ckpt or state.step % 10 == 0):
        return False
    loss_avg, norm_avg = _all_mean([np.mean([w[0] for w in window]), np.mean([w[1] for w in window])],
                                   device)  # fmt: skip
    dt = time.time() - t_log
    row = {"step": state.step, "loss": round(loss_avg, 4), "lr": sched.get_last_lr()[0],
           "grad_norm": round(norm_avg, 4), "tokens_per_s": round((state.tokens - tok_log) / max(dt, 1e-9), 1),
           "tokens": state.tokens, "time": round(time.time(), 3)}  # fmt: skip
    if do_eval:
        row["val_loss"] = _eval(model, val, device)
        row["val_ppl"] = round(math.exp(min(row["val_loss"], 50)), 3) if row["val_loss"] else None
    state.history.append(row)
    if do_ckpt and cfg.ledger:
        _commit_ledger(state)
    if do_eval or do_ckpt:
        _report(state.history[-1], model, tok, opt, sched, state, with_checkpoint=do_ckpt)
    return True


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
    tokens_per_s: float = 0.0  # mean over logged windows after the first (steady state)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """The one-screen account of a run."""
        ppl = (
            (lambda x: f"{math.exp(min(x, 50)):,.1f}") if self.val_loss_final else (lambda x: "n/a")
        )
        val = (f"{self.val_loss_initial:.3f} -> {self.val_loss_final:.3f} "
               f"(perplexity {ppl(self.val_loss_initial)} -> {ppl(self.val_loss_final)})"
               if self.val_loss_final else "n/a (no validation split)")  # fmt: skip
        return "\n".join([
            f"train: {self.steps} steps, {self.tokens:,} tokens, {self.params / 1e6:.1f}M params, "
            f"{self.seconds} s ({self.tokens_per_s:,.0f} tokens/s steady)",
            f"  train loss {self.first_loss:.3f} -> {self.last_loss:.3f}",
            f"  val loss   {val}",
            f"  model      {self.model_dir} (save_pretrained: config, safetensors, tokenizer)",
            f"  metrics    {self.run_dir}/metrics.jsonl, {self.run_dir}/loss.png",
        ])  # fmt: skip


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
    if blocks < cfg.batch_size * cfg.grad_accum * cfg.num_workers:
        raise TrainError(f"train.batch_size ({cfg.batch_size}) x train.num_workers ({cfg.num_workers}) "
                         f"exceeds the {blocks} training blocks in {data_dir}")  # fmt: skip
    return manifest


def latest_complete_checkpoint(run_storage: Path) -> str | None:
    """The newest checkpoint directory with every file a resume needs (for error messages)."""
    done = [d for d in run_storage.glob("checkpoint_*")
            if (d / STATE_FILE).is_file() and (d / "config.json").is_file()]  # fmt: skip
    return str(max(done, key=lambda d: d.name)) if done else None


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

    `cluster_cpus` is what is free now (a Serve replica may hold some). Ray Train takes the
    workers' CPUs out of Ray Data's budget; on a small box (2 workers x 1 CPU on 2 cores) the
    ingest would get none and the run would hang. GPU runs keep the config.
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
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = preflight(cfg, model_cfg, data_dir)
    t0 = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    storage = cfg.storage_path or str(run_dir / "ray")
    cpus = worker_cpus(cfg, ray.available_resources().get("CPU", 0))
    ray.data.DataContext.get_current().enable_progress_bars = False
    data_dir = data_dir if "://" in data_dir else str(Path(data_dir).resolve())
    columns = ["input_ids", "labels"] if manifest.get("format") == "sft" else ["input_ids"]
    # Shards are written in corpus order; without shuffling, the first steps would see one
    # corner of the corpus only (e.g. all of encodings/*.py). Both shuffles are seeded.
    # Reads ask for a quarter CPU: parquet decode is light, and a full-CPU read task could
    # not be scheduled next to the workers on a small or busy cluster (the ingest would hang).
    train_ds = ray.data.read_parquet(
        f"{data_dir}/train", columns=columns, num_cpus=0.25
    ).randomize_block_order(seed=cfg.seed)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(),
            "model": model_cfg.model_dump(),
            "data_dir": data_dir,
            "tokenizer_dir": _local_dir(manifest["tokenizer_dir"]),
            "train_rows": manifest["splits"]["train"]["blocks"],
        },
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers else cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),  # fmt: skip
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),  # fmt: skip
        datasets={"train": train_ds},
        # Not split: every rank iterates the same deterministic order and takes positions
        # p % world == rank, so a resume can skip exactly what was consumed (see _Feed).
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),  # fmt: skip
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        last = (
            latest_complete_checkpoint(Path(storage) / cfg.name) if "://" not in storage else None
        )
        raise TrainError(
            f"training failed after train.max_failures={cfg.max_failures} restarts: "
            f"{str(e).splitlines()[0]}; last checkpoint: {last or 'none'} "
            f"(re-run with the same train.name to resume from it)"
        ) from e
    return _export(result.checkpoint, run_dir, cfg, model_cfg, time.time() - t0)


def _export(checkpoint, run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, secs: float):
    model_dir = run_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    checkpoint.to_directory(str(model_dir))
    history = [json.loads(line) for line in (model_dir / METRICS_FILE).read_text().splitlines()]
    ledger = torch.load(model_dir / STATE_FILE, weights_only=False).get("ledger") or []
    if ledger:
        (run_dir / "ledger.json").write_text(json.dumps(ledger))
    (model_dir / STATE_FILE).unlink()
    (model_dir / LORA_FILE).unlink(missing_ok=True)
    shutil.move(str(model_dir / METRICS_FILE), run_dir / METRICS_FILE)
    _plot_loss(history, run_dir / "loss.png")
    write_resolved(cfg, run_dir, "train_config.resolved.json")
    write_resolved(model_cfg, run_dir, "model_config.resolved.json")
    losses = [r["loss"] for r in history if "loss" in r]
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    from transformers import AutoConfig

    n_params = count_params_from_config(AutoConfig.from_pretrained(str(model_dir)))
    rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][1:]
    return TrainResult(str(model_dir), str(run_dir), history[-1]["step"], history[-1].get("tokens", 0),
                       losses[0], losses[-1], vals[0] if vals else None,
                       vals[-1] if len(vals) > 1 else None, round(secs, 1), n_params,
                       round(float(np.mean(rates)), 1) if rates else 0.0)  # fmt: skip


def count_params_from_config(conf) -> int:
    """Parameter count of a model config, without allocating weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return sum(p.numel() for p in model.parameters())
