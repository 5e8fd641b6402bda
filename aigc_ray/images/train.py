"""Diffusion training on Ray Train's TorchTrainer: a class-conditioned UNet learns to predict the
noise of DDPM-noised images (labels dropped at ``cond_dropout`` for classifier-free guidance).

The machinery is the text trainer's: DDP workers (gloo on CPU, NCCL on GPU), checkpoints every
``checkpoint_every`` steps that a restarted worker group resumes from (Ray Train's
FailureConfig), metrics.jsonl and loss.png in the run directory, export of the final model as a
diffusers pipeline directory. Each evaluation adds the validation loss (fixed noise and
timesteps, so values compare across steps) and a sample grid PNG (a column per class).

Batches are drawn by a generator seeded with (seed, step, rank): a resumed run draws exactly
the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aigc_ray.config import ImageModelConfig, ImageTrainConfig, write_resolved
from aigc_ray.images.data import load_split, read_image_manifest
from aigc_ray.images.model import build_unet, image_grid, noise_scheduler, save_pipeline
from aigc_ray.progress import post
from aigc_ray.train import metrics as train_metrics
from aigc_ray.train.loop import all_mean
from aigc_ray.train.steps import METRICS_FILE, TrainError, lr_factor

log = logging.getLogger(__name__)

STATE_FILE = "image_train_state.pt"
SAMPLES = "samples"
GRID_ROWS = 4


@dataclass
class ImageTrainResult:
    model_dir: str
    run_dir: str
    steps: int
    images: int
    first_loss: float
    last_loss: float
    val_loss_initial: float | None
    val_loss_final: float | None
    seconds: float
    params: int
    images_per_s: float
    grids: list[str]

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        val = (
            f"{self.val_loss_initial:.4f} -> {self.val_loss_final:.4f}"
            if self.val_loss_final is not None
            else "n/a (no validation split)"
        )
        return "\n".join(
            [
                f"train: {self.steps} steps, {self.images:,} images, "
                f"{self.params / 1e6:.2f}M params, {self.seconds} s "
                f"({self.images_per_s:,.0f} images/s steady)",
                f"  train loss {self.first_loss:.4f} -> {self.last_loss:.4f} (noise MSE)",
                f"  val loss   {val}",
                f"  model      {self.model_dir} (diffusers pipeline: model_index.json, unet, "
                "scheduler, labels.json)",
                f"  metrics    {self.run_dir}/metrics.jsonl, {self.run_dir}/loss.png",
                f"  samples    {self.grids[-1] if self.grids else '-'}",
            ]
        )


# ---------------------------------------------------------------- pure pieces (no Ray)


def diffusion_loss(model, scheduler, x0, labels, generator, null_class: int, cond_dropout: float):
    """Noise-prediction MSE at random timesteps; a share of labels become the null class."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    drop = torch.rand(n, generator=generator) < cond_dropout
    labels = torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
    t = t.to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    pred = model(noisy, t, class_labels=labels).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


@torch.no_grad()
def val_loss(model, scheduler, images, labels, seed: int, device) -> float | None:
    """Mean noise MSE on the validation images at 4 fixed timesteps each, fixed noise."""
    if len(images) == 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    steps = scheduler.config.num_train_timesteps
    for frac in (0.1, 0.3, 0.6, 0.9):
        for i in range(0, len(images), 256):
            x0 = torch.from_numpy(images[i : i + 256]).to(device)
            lab = torch.from_numpy(labels[i : i + 256]).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full((len(x0),), int(frac * (steps - 1)), device=device)
            pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=lab).sample
            total += float(torch.nn.functional.mse_loss(pred, noise, reduction="sum"))
            count += noise.numel()
    return total / count


@torch.no_grad()
def sample_grid(unet, scheduler, labels: list[str], steps: int, guidance: float, seed: int):
    """A GRID_ROWS x classes grid (HxWxC uint8) from the model as it is now."""
    from aigc_ray.images.model import ImagePipeline

    pipe = ImagePipeline.from_unet(unet, scheduler, labels)  # sampled as when served
    cols = min(len(labels), 10)
    prompts = [labels[c] for _ in range(GRID_ROWS) for c in range(cols)]
    seeds = [seed + i for i in range(len(prompts))]
    was_training = unet.training
    unet.eval()
    images = pipe.generate(prompts, seeds, steps, guidance)
    unet.train(was_training)
    return image_grid(images, cols, scale=max(1, 64 // unet.config.sample_size))


def _save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


# ---------------------------------------------------------------- worker loop


def image_train_loop(config: dict) -> None:
    """Ray Train entry point: config holds train, model, data_dir and the manifest."""
    import ray.train
    import ray.train.torch

    cfg = ImageTrainConfig(**config["train"])
    mcfg = ImageModelConfig(**config["model"])
    manifest, data_dir = config["manifest"], config["data_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    labels = manifest["labels"]
    x_train, y_train = load_split(data_dir, "train", manifest)
    x_val, y_val = load_split(data_dir, "val", manifest)
    torch.manual_seed(cfg.seed)
    scheduler = noise_scheduler(mcfg.num_train_timesteps)
    saved, grids = None, {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        unet = build_unet(mcfg, manifest["image_size"], manifest["channels"], len(labels))
    else:
        from diffusers import UNet2DModel

        with ckpt.as_directory() as d:
            unet = UNet2DModel.from_pretrained(f"{d}/unet")
            saved = torch.load(f"{d}/{STATE_FILE}", weights_only=False)
            grids = {p.name: p.read_bytes() for p in Path(d, SAMPLES).glob("*.png")}
        log.info("rank %d resumed at step %d", rank, saved["step"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(unet)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, 0.1)
    )
    step, history = 0, []
    if saved:
        opt.load_state_dict(saved["optimizer"])
        lr_sched.load_state_dict(saved["scheduler"])
        step, history = saved["step"], saved["history"]
    else:
        history.append({"step": 0, "val_loss": val_loss(unet, scheduler, x_val, y_val, 0, device)})
    train_metrics.start(cfg.name, history)
    board = config.get("progress") if rank == 0 else None
    post(board, history[-1])
    null = len(labels)
    window, started = [], time.time()
    while step < cfg.max_steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen).numpy()
        x0 = torch.from_numpy(x_train[idx]).to(device)
        lab = torch.from_numpy(y_train[idx]).to(device)
        loss = diffusion_loss(model, scheduler, x0, lab, gen, null, cfg.cond_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        step += 1
        window.append(float(loss))
        last = step >= cfg.max_steps
        do_eval = last or step % cfg.eval_every == 0
        do_ckpt = do_eval or step % cfg.checkpoint_every == 0
        if not (do_ckpt or step % 10 == 0):
            continue
        (mean_loss,) = all_mean([float(np.mean(window))], device)
        dt = time.time() - started
        row = {
            "step": step,
            "loss": round(mean_loss, 5),
            "lr": lr_sched.get_last_lr()[0],
            "images_per_s": round(len(window) * cfg.batch_size * world / max(dt, 1e-9), 1),
            "images": step * cfg.batch_size * world,
            "time": round(time.time(), 3),
        }
        if do_eval:
            row["val_loss"] = val_loss(unet, scheduler, x_val, y_val, 0, device)
            if rank == 0:
                grid = sample_grid(
                    unet, scheduler, labels, cfg.sample_steps, cfg.guidance_scale, cfg.seed
                )
                with tempfile.NamedTemporaryFile(suffix=".png") as f:
                    _save_png(grid, f.name)
                    grids[f"step_{step:06d}.png"] = Path(f.name).read_bytes()
        history.append(row)
        post(board, row)
        train_metrics.record(cfg.name, row, dt / len(window))
        window, started = [], time.time()
        if do_ckpt:
            _report(row, rank, unet, scheduler, labels, opt, lr_sched, step, history, grids)
            train_metrics.checkpointed(cfg.name)


def _report(row, rank, unet, scheduler, labels, opt, lr_sched, step, history, grids) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (pipeline dir + state + grids)."""
    import ray.train

    if rank != 0:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as d:
        save_pipeline(unet, scheduler, labels, d)
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": lr_sched.state_dict(),
            "step": step,
            "history": history,
        }
        torch.save(state, f"{d}/{STATE_FILE}")
        with open(f"{d}/{METRICS_FILE}", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        os.makedirs(f"{d}/{SAMPLES}")
        for name, data in grids.items():
            Path(d, SAMPLES, name).write_bytes(data)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------- driver


def image_preflight(cfg: ImageTrainConfig, data_dir: str) -> dict:
    from aigc_ray.data import DataError

    try:
        manifest = read_image_manifest(data_dir)
    except DataError as e:
        raise TrainError(f"images.train: {e}") from None
    if manifest["splits"]["train"]["images"] < cfg.batch_size:
        raise TrainError(
            f"images.train.batch_size ({cfg.batch_size}) exceeds the "
            f"{manifest['splits']['train']['images']} training images in {data_dir}"
        )
    if len(manifest["labels"]) < 1:
        raise TrainError(f"no class labels in {data_dir}: image training needs labelled images")
    return manifest


def fit_images(cfg: ImageTrainConfig, mcfg: ImageModelConfig, data_dir: str) -> ImageTrainResult:
    """Train with a TorchTrainer (train.fit.run_trainer); export the pipeline to run_dir/model."""
    from aigc_ray.progress import Progress
    from aigc_ray.storage import portable_location
    from aigc_ray.train.fit import run_trainer

    manifest = image_preflight(cfg, data_dir)
    t0 = time.time()

    def show(progress, row: dict) -> None:
        fields = {"loss": row.get("loss"), "images/s": row.get("images_per_s")}
        if row.get("val_loss") is not None:
            fields["val loss"] = row["val_loss"]
        progress.update(row["step"], fields)

    result = run_trainer(
        image_train_loop,
        {
            "train": cfg.model_dump(),
            "model": mcfg.model_dump(),
            "data_dir": portable_location(data_dir),
            "manifest": manifest,
        },
        cfg,
        {"num_workers": cfg.num_workers, "resources_per_worker": {"CPU": cfg.cpus_per_worker}},
        Progress("train", cfg.max_steps, "steps"),
        show,
        lambda e: (
            f"image training failed after images.train.max_failures={cfg.max_failures} "
            f"restarts: {str(e).splitlines()[0]} (re-run with the same name to resume)"
        ),
    )
    run_dir = Path(cfg.run_dir).resolve()
    return _export(result.checkpoint, run_dir, cfg, mcfg, time.time() - t0)


def _export(checkpoint, run_dir: Path, cfg, mcfg, secs: float) -> ImageTrainResult:
    from aigc_ray.train.fit import plot_loss

    model_dir = run_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    checkpoint.to_directory(str(model_dir))
    history = [json.loads(line) for line in (model_dir / METRICS_FILE).read_text().splitlines()]
    (model_dir / STATE_FILE).unlink()
    shutil.move(str(model_dir / METRICS_FILE), run_dir / METRICS_FILE)
    samples = run_dir / SAMPLES
    shutil.rmtree(samples, ignore_errors=True)
    shutil.move(str(model_dir / SAMPLES), samples)
    plot_loss(history, run_dir / "loss.png", "noise-prediction MSE")
    write_resolved(cfg, run_dir, "train_config.resolved.json")
    write_resolved(mcfg, run_dir, "model_config.resolved.json")
    from diffusers import UNet2DModel

    params = sum(p.numel() for p in UNet2DModel.from_pretrained(f"{model_dir}/unet").parameters())
    losses = [r["loss"] for r in history if "loss" in r]
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    rates = [r["images_per_s"] for r in history if "images_per_s" in r][1:]
    return ImageTrainResult(
        model_dir=str(model_dir),
        run_dir=str(run_dir),
        steps=history[-1]["step"],
        images=history[-1].get("images", 0),
        first_loss=losses[0],
        last_loss=losses[-1],
        val_loss_initial=vals[0] if vals else None,
        val_loss_final=vals[-1] if len(vals) > 1 else None,
        seconds=round(secs, 1),
        params=params,
        images_per_s=round(float(np.mean(rates)), 1) if rates else 0.0,
        grids=[str(p) for p in sorted(samples.glob("*.png"))],
    )
