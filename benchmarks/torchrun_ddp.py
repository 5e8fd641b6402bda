"""Reference for bench_train: plain torchrun + DDP training of the same model on the same shards.

No Ray. Same pieces as aigc_ray's worker loop: `build_model` from the same ModelConfig and seed,
the tokenizer from the manifest, `build_optimizer` / `build_scheduler`, and the step function
`accumulate_step` (what `train_step` calls; it also takes `train.grad_accum` micro-batches and
the autocast dtype of `precision(train, device)`, as our workers do). Data: the train shards
listed in manifest.json, read with pyarrow in order; rank r takes rows r::world and cuts them
into micro-batches of `train.batch_size` (wrapping around if the run needs more rows).

Like our worker loop it evaluates the same validation batches (`load_val_batches`,
`train.eval_batches` per rank) before the first step and after the last, and rank 0 saves the
final model with `save_pretrained` (`--save-dir`): the work a user's own script does too, so
that the startup difference bench_train.py reports is the frameworks', not extra work of ours.

Times the steps after `--warmup` steps with time.perf_counter; rank 0 prints one JSON line
(global tokens/s, steps, threads, ...) that bench_train.py parses.

    torchrun --standalone --nproc_per_node=2 benchmarks/torchrun_ddp.py \
        --data-dir DIR --config cfg.json [--steps 60] [--warmup 10] [--gpu] [--save-dir DIR]

`cfg.json` holds {"train": TrainConfig dump, "model": ModelConfig dump}. With --gpu: NCCL, one
GPU per process (LOCAL_RANK), autocast per `train.precision` (bf16 by default; CPU runs fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from aigc_ray.config import ModelConfig, TrainConfig
from aigc_ray.data import read_manifest
from aigc_ray.model import build_model, count_params, load_tokenizer
from aigc_ray.train import accumulate_step, build_optimizer, build_scheduler, precision
from aigc_ray.train.steps import evaluate, load_val_batches

log = logging.getLogger("torchrun_ddp")


def load_rows(manifest: dict, seq_len: int, rank: int, world: int) -> np.ndarray:
    """This rank's rows (r::world) of the train shards, in manifest order, as [rows, seq_len]."""
    shards = manifest["splits"]["train"]["shards"]
    tables = [pq.read_table(s, columns=["input_ids"]) for s in shards]
    flat = np.concatenate(
        [t.column("input_ids").combine_chunks().flatten().to_numpy() for t in tables]
    )
    return flat.reshape(-1, seq_len)[rank::world]


def batches(rows: np.ndarray, batch_size: int, accum: int, steps: int):
    """Per step, `accum` [batch_size, seq_len] int64 tensors, in order, wrapping around the rows."""
    per_step = batch_size * accum
    per_epoch = len(rows) // per_step
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} rows per rank < one step of {per_step}")
    if steps > per_epoch:
        log.warning("%d steps > %d per epoch on each rank: wrapping around", steps, per_epoch)
    for step in range(steps):
        start = (step % per_epoch) * per_step
        yield [
            torch.from_numpy(rows[i : i + batch_size].astype(np.int64))
            for i in range(start, start + per_step, batch_size)
        ]


def setup(gpu: bool) -> torch.device:
    """Process group (gloo on CPU, NCCL on GPU) and this process's device."""
    if gpu:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def build(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer_dir: str, device, rank: int):
    """DDP model, optimizer and scheduler exactly as the aigc_ray worker builds them."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(cfg.seed + rank)
    model = build_model(model_cfg, load_tokenizer(tokenizer_dir), seed=cfg.seed).to(device)
    params = count_params(model)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(ddp, cfg)
    return ddp, opt, build_scheduler(opt, cfg), params


def run(args, cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> dict:
    """Train `args.steps` steps; time those after `args.warmup`; return rank-local figures."""
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = read_manifest(args.data_dir)
    model, opt, sched, params = build(cfg, model_cfg, manifest["tokenizer_dir"], device, rank)
    rows = load_rows(manifest, cfg.seq_len, rank, world)
    val = load_val_batches(args.data_dir, rank, world, cfg.batch_size, cfg.eval_batches)
    val_initial = evaluate(model, val, device)
    amp, scaler = precision(cfg, device)
    steps = batches(rows, cfg.batch_size, cfg.grad_accum, args.steps)
    losses, t0 = [], None
    for step, micro in enumerate(steps, start=1):
        micro = [(ids.to(device), None) for ids in micro]
        loss, _ = accumulate_step(model, micro, opt, sched, cfg.grad_clip, amp, scaler)
        losses.append(loss)
        if step == args.warmup:
            t0 = time.perf_counter()
    secs = time.perf_counter() - t0
    val_final = evaluate(model, val, device)
    if rank == 0 and args.save_dir:
        model.module.save_pretrained(args.save_dir)
        load_tokenizer(manifest["tokenizer_dir"]).save_pretrained(args.save_dir)
    timed = args.steps - args.warmup
    per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * world
    return {
        "tokens_per_s": round(timed * per_step / secs, 1),
        "steps": args.steps,
        "timed_steps": timed,
        "timed_s": round(secs, 3),
        "tokens": args.steps * per_step,
        "world": world,
        "threads": torch.get_num_threads(),
        "params": params,
        "last_loss": round(float(np.mean(losses[-10:])), 4),
        "val_loss_initial": round(val_initial, 4),
        "val_loss_final": round(val_final, 4),
        "device": str(device),
        "amp": str(amp),
    }


def main_with(argv, doc: str, key: str, run_fn, ddp_options: bool = True) -> int:
    """The command line both reference scripts share (this one and torchrun_dp.py): parse the
    arguments, set up the process group, run `run_fn(args, train, model, device)` and print
    rank 0's result as one JSON line {key: result}."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--config", required=True, help="JSON with train and model config dumps")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    if ddp_options:
        ap.add_argument("--gpu", action="store_true")
        ap.add_argument("--save-dir", help="rank 0 saves the final model here (save_pretrained)")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with open(args.config) as f:
        raw = json.load(f)
    device = setup(getattr(args, "gpu", False))
    try:
        result = run_fn(args, TrainConfig(**raw["train"]), ModelConfig(**raw["model"]), device)
        if dist.get_rank() == 0:
            print(json.dumps({key: result}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_with(argv, __doc__, "torchrun_ddp", run)


if __name__ == "__main__":
    sys.exit(main())
