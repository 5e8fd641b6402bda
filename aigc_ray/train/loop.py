"""The Ray Train worker loop: restore, step, evaluate, report checkpoints."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from aigc_ray.config import ModelConfig, TrainConfig
from aigc_ray.engine.params import usable_device
from aigc_ray.model import perplexity
from aigc_ray.progress import post
from aigc_ray.train import metrics as train_metrics
from aigc_ray.train import privacy
from aigc_ray.train.checkpoint import (
    _gather_for_save,
    _load_optimizer,
    new_model,
    restore_model,
    save_model,
)
from aigc_ray.train.feed import ShardReader, _Feed, check_same_order
from aigc_ray.train.steps import (
    METRICS_FILE,
    STATE_FILE,
    accumulate_step,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_val_batches,
    precision,
)

log = logging.getLogger(__name__)


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    history: list | None = None
    ledger: list | None = None  # committed (epoch, position) pairs, all ranks, in checkpoints
    epoch: int = 0
    epoch_pos: int = 0  # next unconsumed position of the epoch (independent of world size)
    pending: list = field(default_factory=list)  # this rank's pairs since the last checkpoint


@dataclass
class _Worker:
    """One rank's training context: what every step, evaluation and checkpoint works on."""

    cfg: TrainConfig
    model: torch.nn.Module
    tok: object
    opt: torch.optim.Optimizer
    sched: object
    state: _State
    val: list  # this rank's validation batches
    device: torch.device
    marks: dict = field(default_factory=dict)  # wall-clock times of the startup phases
    board: object = None  # rank 0: the driver's progress board (aigc_ray.progress)
    plain: torch.nn.Module | None = None  # the model inside the DDP / Opacus wrappers
    dp: object = None  # train.privacy: the run's privacy.Ledger (its DPPlan as .dp)
    stopped: str | None = None  # why a DP run stopped before train.max_steps

    @property
    def net(self) -> torch.nn.Module:
        """The model to save and evaluate."""
        return self.plain if self.plain is not None else self.model


@dataclass
class _LogWindow:
    """Steps since the last logged row: their (loss, grad norm), start time and token count."""

    started: float
    tokens: int
    steps: list = field(default_factory=list)


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum over the ranks (the values themselves without a process group)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float], device) -> list[float]:
    return [v / _world_size() for v in all_sum(values, device)]


def _privacy_state(w: _Worker) -> dict | None:
    """train.privacy: the accountant's state (a resumed run goes on spending from it), the
    plan it runs and what it has spent."""
    if w.dp is None:
        return None
    return {
        "plan": w.dp.dp.as_dict(),
        "accountant": w.dp.state_dict(),
        "epsilon": w.dp.epsilon(),
        "steps": w.dp.steps,
        "stopped": w.stopped,
    }


def _save_checkpoint(
    model,
    tok,
    opt_state: dict,
    model_state,
    sched,
    state: _State,
    directory: str,
    privacy_state: dict | None = None,
) -> None:
    save_model(model, tok, directory, model_state)
    torch.save(
        {
            "optimizer": opt_state,
            "scheduler": sched.state_dict(),
            "step": state.step,
            "tokens": state.tokens,
            "ledger": state.ledger,
            "epoch": state.epoch,
            "epoch_pos": state.epoch_pos,
            "rng": torch.get_rng_state(),
            "privacy": privacy_state,
        },
        os.path.join(directory, STATE_FILE),
    )
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state.history)


def _report(w: _Worker, metrics: dict, with_checkpoint: bool) -> None:
    """Every rank calls this the same number of times; rank 0 attaches the checkpoint."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    model_state, opt_state = _gather_for_save(w.model, w.opt) if with_checkpoint else (None, None)
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        _save_checkpoint(
            w.net, w.tok, opt_state, model_state, w.sched, w.state, d, _privacy_state(w)
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    train_metrics.checkpointed(w.cfg.name)


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
    tokenizer_dir, train_rows, columns."""
    import ray.train
    import ray.train.torch

    from aigc_ray.model import load_tokenizer
    from aigc_ray.storage import local_model_dir

    marks = {"entered": time.time()}  # startup phases, in metrics.jsonl's step-0 row
    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    tok = load_tokenizer(local_model_dir(config["tokenizer_dir"]))  # s3:// -> this node's cache
    model, saved = _restore(config, tok)
    marks["model"] = time.time()
    device = ray.train.torch.get_device()
    if cfg.use_gpu:  # fails loudly on a GPU torch cannot see (CPU only on fake GPU nodes)
        device = torch.device(usable_device(str(device), f"training worker {rank}"))
    plain, ledger = None, None
    if cfg.privacy.enabled:  # DP-SGD: Opacus' wrappers instead of DDP (see train.privacy)
        plain = model.to(device)
        opt = build_optimizer(plain, cfg)
        sched = build_scheduler(opt, cfg)
        ledger = _dp_ledger(privacy.DPPlan(**config["privacy_plan"]), saved, rank)
        model, opt = privacy.make_private(plain, opt, ledger.dp, world)
    else:
        model = _prepare(model, cfg, device)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg)
    marks["prepare"] = time.time()
    state = _State(history=[], ledger=[])
    if saved:
        _load_optimizer(model, opt, saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = _State(
            saved["step"],
            saved["tokens"],
            saved["history"],
            saved.get("ledger", []),
            saved.get("epoch", 0),
            saved.get("epoch_pos", 0),
        )
        log.info("rank %d resumed at step %d", rank, state.step)
    val = load_val_batches(config["data_dir"], rank, world, cfg.batch_size, cfg.eval_batches)
    if state.step == 0:
        row = {"step": 0, "val_loss": evaluate(plain or model, val, device)}
        state.history.append({**row, "epsilon": 0.0} if ledger else row)
    marks["eval"] = time.time()
    # Shards are written in corpus order; without shuffling, the first steps would see one
    # corner of the corpus only (e.g. all of encodings/*.py): the order is seeded per epoch.
    # DP-SGD samples each step's rows by Poisson sampling instead (privacy.PoissonFeed).
    split = f"{config['data_dir']}/train"
    if ledger:
        source = ShardReader(split, config["columns"], cfg.seed, 0)
        feed = privacy.PoissonFeed(
            cfg, rank, world, config["train_rows"], source, ledger.dp.sample_rate
        )
    else:
        source = ShardReader(split, config["columns"], cfg.seed, cfg.shuffle_buffer)
        feed = _Feed(cfg, rank, world, config["train_rows"], source)
    marks["feed"] = time.time()
    train_metrics.start(cfg.name, state.history)
    board = config.get("progress") if rank == 0 else None
    post(board, state.history[-1])
    w = _Worker(cfg, model, tok, opt, sched, state, val, device, marks, board, plain, ledger)
    if saved and saved.get("privacy"):
        w.stopped = saved["privacy"].get("stopped")
    if ledger:
        _run_dp_steps(w, feed)
    else:
        _run_steps(w, feed)


def _dp_ledger(fresh: privacy.DPPlan, saved: dict | None, rank: int):
    """The run's privacy.Ledger: `fresh` is the plan the driver computed for this run; a resumed
    run keeps the noise, sample rate and delta it started with and the privacy it has spent
    (its accountant's state)."""
    kept = (saved or {}).get("privacy")
    if not kept:
        return privacy.Ledger(fresh)
    dp = privacy.DPPlan(**kept["plan"])
    if rank == 0 and (dp.noise_multiplier, dp.sample_rate) != (
        fresh.noise_multiplier,
        fresh.sample_rate,
    ):
        log.warning(
            "DP-SGD: resuming with the checkpoint's noise multiplier %.4g and sample rate %.4g "
            "(the config now gives %.4g and %.4g)",
            dp.noise_multiplier,
            dp.sample_rate,
            fresh.noise_multiplier,
            fresh.sample_rate,
        )
    return privacy.Ledger(dp, kept["accountant"])


def _prepare(model, cfg: TrainConfig, device: torch.device):
    """DDP through Ray Train's prepare_model, or FSDP2's fully_shard (CPU/gloo or GPU/NCCL)."""
    import ray.train.torch

    if cfg.strategy == "fsdp":
        from aigc_ray.train.fsdp import shard_model

        return shard_model(model, device, precision(cfg, device)[0])
    return ray.train.torch.prepare_model(model, move_to_device=device)


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


def _run_steps(w: _Worker, feed: _Feed) -> None:
    cfg, state = w.cfg, w.state
    amp, scaler = precision(cfg, w.device)
    if cfg.strategy == "fsdp":
        amp = None  # FSDP's mixed-precision policy casts the parameters instead of autocast
    window = _LogWindow(time.time(), state.tokens)
    while state.step < cfg.max_steps:
        for n, (epoch, positions, micro) in enumerate(feed.steps(state.epoch, state.epoch_pos)):
            if n == 0:
                check_same_order(feed.probe[0], w.device)
                _record_startup(w)
            micro = [
                (i.to(w.device), None if lab is None else lab.to(w.device)) for i, lab in micro
            ]
            loss, norm = accumulate_step(w.model, micro, w.opt, w.sched, cfg.grad_clip, amp, scaler)
            if cfg.step_delay_s:  # pacing for tests and demos only
                time.sleep(cfg.step_delay_s)
            state.step += 1
            state.epoch_pos += feed.per_step
            state.tokens += sum(i.numel() for i, _ in micro) * feed.world
            if cfg.ledger:
                state.pending += [(epoch, int(p)) for p in positions]
            window.steps.append((loss, norm))
            if _after_step(w, window):
                window = _LogWindow(time.time(), state.tokens)
            if state.step >= cfg.max_steps:
                return
        state.epoch, state.epoch_pos = state.epoch + 1, 0


def _run_dp_steps(w: _Worker, feed) -> None:
    """DP-SGD steps: each step's Poisson batch (feed.step), Opacus' clipped and noised
    update, one accountant step; a row logged after every step with the epsilon spent. When
    train.privacy.target_epsilon is set, the run stops before a step that would exceed it."""
    cfg, state, budget = w.cfg, w.state, w.dp.dp.target_epsilon
    check_same_order(feed.probe[0], w.device)
    while state.step < cfg.max_steps and not w.stopped:
        if budget is not None and w.dp.epsilon_after_next() > budget:
            w.stopped = (
                f"step {state.step + 1} would spend epsilon {w.dp.epsilon_after_next():.4f}, "
                f"more than train.privacy.target_epsilon={budget}: stopped after step "
                f"{state.step} at epsilon {w.dp.epsilon():.4f}"
            )
            log.warning("DP-SGD: %s", w.stopped)
            break
        _record_startup(w)
        window = _LogWindow(time.time(), state.tokens)
        positions, micro = feed.step(state.step)
        micro = [(i.to(w.device), None if lab is None else lab.to(w.device)) for i, lab in micro]
        loss_sum, rows, norm = privacy.dp_step(w.model, micro, w.opt, w.sched)
        w.dp.step()
        if cfg.step_delay_s:
            time.sleep(cfg.step_delay_s)
        total_loss, total_rows = all_sum([loss_sum, rows], w.device)
        state.step += 1
        state.tokens += int(total_rows) * feed.seq_len
        if cfg.ledger:  # DP: (step, position) of every row the step drew (its "epoch" = step)
            state.pending += [(state.step, int(p)) for p in positions]
        window.steps.append((total_loss / max(total_rows, 1), norm))
        _after_step(w, window)
    if w.stopped:  # the last row (every step has one) gets a validation loss and the reason
        row = state.history[-1]
        if row.get("val_loss") is None:
            row["val_loss"] = evaluate(w.net, w.val, w.device)
            row["val_ppl"] = round(perplexity(row["val_loss"]), 3) if row["val_loss"] else None
        row["stopped"] = w.stopped
        if cfg.ledger:
            _commit_ledger(state)
        _report(w, row, with_checkpoint=True)


def _record_startup(w: _Worker) -> None:
    """Seconds of each startup phase (first batch = feed opened -> first batch on all ranks),
    kept in the step-0 row of a fresh run: `entered` is when this worker's loop began."""
    m = w.marks
    if not m or w.state.step or not w.state.history or w.state.history[0].get("step") != 0:
        return
    m["first_batch"] = time.time()
    names = list(m)
    w.state.history[0]["startup"] = {
        "entered": round(m["entered"], 3),
        **{b: round(m[b] - m[a], 3) for a, b in zip(names, names[1:], strict=False)},
    }
    w.marks = {}


def _world_size() -> int:
    """Workers in the group that ran the logged steps (elastic runs change it)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def optimizer_steps(opt: torch.optim.Optimizer) -> int:
    """Steps as the optimizer's own state counts them (AdamW's per-parameter `step`): the run's
    step count unless that state was lost, e.g. not restored on a resume (or fp16's scaler
    skipped steps). 0 before the first step."""
    for group in opt.param_groups:
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if step is not None:
                return int(step.full_tensor() if hasattr(step, "full_tensor") else step)
    return 0


def _after_step(w: _Worker, window: _LogWindow) -> bool:
    """Log every 10 steps, evaluate and checkpoint on schedule; True when a row was logged."""
    cfg, state = w.cfg, w.state
    last = state.step >= cfg.max_steps
    do_eval = last or state.step % cfg.eval_every == 0
    do_ckpt = last or state.step % cfg.checkpoint_every == 0
    every = 1 if w.dp is not None else 10  # DP: epsilon after every step
    if not (do_eval or do_ckpt or state.step % every == 0):
        return False
    means = [np.mean([s[0] for s in window.steps]), np.mean([s[1] for s in window.steps])]
    # DP windows already hold the global loss and the (all-reduced) noised gradient's norm
    loss_avg, norm_avg = means if w.dp is not None else all_mean(means, w.device)
    dt = time.time() - window.started
    row = {
        "step": state.step,
        "loss": round(loss_avg, 4),
        "lr": w.sched.get_last_lr()[0],
        "grad_norm": round(norm_avg, 4),
        "tokens_per_s": round((state.tokens - window.tokens) / max(dt, 1e-9), 1),
        "tokens": state.tokens,
        "workers": _world_size(),
        "optimizer_step": optimizer_steps(w.opt),
        "time": round(time.time(), 3),
    }
    if w.dp is not None:
        row["epsilon"] = round(w.dp.epsilon(), 6)
    if do_eval:
        row["val_loss"] = evaluate(w.net, w.val, w.device)
        row["val_ppl"] = round(perplexity(row["val_loss"]), 3) if row["val_loss"] else None
    state.history.append(row)
    post(w.board, row)
    train_metrics.record(cfg.name, row, dt / len(window.steps))
    if do_ckpt and cfg.ledger:
        _commit_ledger(state)
    if do_eval or do_ckpt:
        _report(w, state.history[-1], with_checkpoint=do_ckpt)
    return True
