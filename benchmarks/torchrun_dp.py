"""Reference for bench_dp: DP-SGD the way an Opacus user writes it, under torchrun, no Ray.

The same model (`build_model`, same ModelConfig, seed and tokenizer), optimizer and schedule
(`build_optimizer`, `build_scheduler`) as aigc_ray's workers, made private with Opacus'
PrivacyEngine.make_private: DPDDP across the ranks, its Poisson DPDataLoader over all training
rows (batch_size = the global batch, so the sample rate is batch x world / rows, as ours), the
same noise multiplier and per-sample clip, the RDP accountant. The loss is the model's own.

Times the steps after `--warmup` with time.perf_counter; rank 0 prints one JSON line.

    torchrun --standalone --nproc_per_node=2 benchmarks/torchrun_dp.py \
        --data-dir DIR --config cfg.json [--steps 60] [--warmup 10]
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrun_ddp import main_with  # the benchmarks folder is the script's sys.path[0]

from aigc_ray.config import ModelConfig, TrainConfig
from aigc_ray.data import read_manifest
from aigc_ray.model import build_model, count_params, load_tokenizer
from aigc_ray.train import build_optimizer, build_scheduler


def all_rows(manifest: dict, seq_len: int) -> torch.Tensor:
    shards = manifest["splits"]["train"]["shards"]
    flat = np.concatenate(
        [
            pq.read_table(s, columns=["input_ids"])
            .column("input_ids")
            .combine_chunks()
            .flatten()
            .to_numpy()
            for s in shards
        ]
    )
    return torch.from_numpy(flat.reshape(-1, seq_len).astype(np.int64))


def run(args, cfg: TrainConfig, model_cfg: ModelConfig, device) -> dict:
    """DP-SGD steps as an Opacus user writes them (CPU, gloo: `device` is the CPU)."""
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = read_manifest(args.data_dir)
    torch.manual_seed(cfg.seed + rank)
    model = build_model(model_cfg, load_tokenizer(manifest["tokenizer_dir"]), seed=cfg.seed)
    params = count_params(model)
    model = DPDDP(model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    rows = all_rows(manifest, cfg.seq_len)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(rows), batch_size=cfg.batch_size * world
    )
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=cfg.privacy.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
    )
    model.train()
    step, tokens, t0, losses = 0, 0, None, []
    warnings.filterwarnings("ignore", "Full backward hook is firing")
    while step < args.steps:
        for (ids,) in loader:
            if not len(ids):  # an empty Poisson batch on this rank
                continue
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step == args.warmup:
                t0 = time.perf_counter()
            elif step > args.warmup:
                tokens += ids.numel()
            if step >= args.steps:
                break
    secs = time.perf_counter() - t0
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    return {
        "tokens_per_s": round(float(total) / secs, 1),
        "steps": args.steps,
        "timed_s": round(secs, 3),
        "tokens": float(total),
        "world": world,
        "threads": torch.get_num_threads(),
        "params": params,
        "last_loss": round(float(np.mean(losses[-10:])), 4),
        "epsilon": round(engine.get_epsilon(1.0 / len(rows)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    return main_with(argv, __doc__, "torchrun_dp", run, ddp_options=False)


if __name__ == "__main__":
    sys.exit(main())
