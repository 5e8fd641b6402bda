"""Driver side: preflight, the TorchTrainer run, export of the final model and metrics."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aigc_ray.config import ModelConfig, TrainConfig, write_resolved
from aigc_ray.engine.params import FAKE_CLUSTER_ENV
from aigc_ray.model import perplexity
from aigc_ray.progress import Progress, Watch
from aigc_ray.storage import (
    check_export_dir,
    copy_model_dir,
    filesystem_for,
    is_uri,
    portable_location,
)
from aigc_ray.train.checkpoint import latest_complete_checkpoint
from aigc_ray.train.loop import train_loop_per_worker
from aigc_ray.train.steps import ADAPTER_DIR, LORA_FILE, METRICS_FILE, STATE_FILE, TrainError

log = logging.getLogger(__name__)


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
    exported_to: str | None = None  # train.export_dir, when set (e.g. s3:// for a cluster)
    export_s: float = 0.0  # driver seconds after trainer.fit() returned: export, plot, copies
    privacy: dict | None = None  # train.privacy: epsilon, delta, noise, sample rate, steps
    adapter_dir: str | None = None  # model.lora_r: the PEFT adapter (over its base)

    @property
    def serving_dir(self) -> str:
        """The copy every node can reach when there is one, else the local model dir."""
        return self.exported_to or self.model_dir

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """The one-screen account of a run."""
        ppl = (lambda x: f"{perplexity(x):,.1f}") if self.val_loss_final else (lambda x: "n/a")
        val = (
            f"{self.val_loss_initial:.3f} -> {self.val_loss_final:.3f} "
            f"(perplexity {ppl(self.val_loss_initial)} -> {ppl(self.val_loss_final)})"
            if self.val_loss_final
            else "n/a (no validation split)"
        )
        return "\n".join(
            [
                f"train: {self.steps} steps, {self.tokens:,} tokens, "
                f"{self.params / 1e6:.1f}M params, "
                f"{self.seconds} s ({self.tokens_per_s:,.0f} tokens/s steady)",
                f"  train loss {self.first_loss:.3f} -> {self.last_loss:.3f}",
                f"  val loss   {val}",
                f"  model      {self.model_dir} (save_pretrained: config, safetensors, tokenizer)",
                f"  metrics    {self.run_dir}/metrics.jsonl, {self.run_dir}/loss.png",
                *([f"  exported   {self.exported_to}"] if self.exported_to else []),
                *(
                    [f"  adapter    {self.adapter_dir} (PEFT, over its base)"]
                    if self.adapter_dir
                    else []
                ),
                *([privacy_line(self.privacy)] if self.privacy else []),
            ]
        )


def privacy_line(p: dict) -> str:
    """The summary's DP-SGD line: the guarantee spent and how."""
    line = (
        f"  privacy    ({p['epsilon']:.3f}, {p['delta']:.3g})-DP over {p['steps']} steps "
        f"(noise {p['noise_multiplier']:.4g}, sample rate {p['sample_rate']:.4g}, "
        f"clip {p['max_grad_norm']}, {p['accountant']} accountant)"
    )
    return line + (f"\n  stopped    {p['stopped']}" if p.get("stopped") else "")


def preflight(cfg: TrainConfig, model_cfg: ModelConfig, data_dir: str) -> dict:
    """Check everything checkable before any worker starts; return the data manifest."""
    from aigc_ray.data import DataError, read_manifest
    from aigc_ray.model import check_model_dir

    if model_cfg.pretrained:
        check_model_dir(model_cfg.pretrained)
    if cfg.strategy == "fsdp" and model_cfg.lora_r:
        raise TrainError("train.strategy=fsdp with model.lora_r is not supported: use ddp")
    if cfg.privacy.enabled:  # what Opacus cannot run, before any worker starts
        from aigc_ray.train import privacy

        privacy.check_settings(cfg)
        privacy.check_model_config(model_cfg)
    if cfg.export_dir:
        try:
            check_export_dir(Path(cfg.run_dir) / "model", cfg.export_dir)
        except ValueError as e:
            raise TrainError(str(e)) from None
    try:
        manifest = read_manifest(data_dir)
    except DataError as e:
        raise TrainError(f"train.data_dir: {e}") from None
    missing = [k for k in ("seq_len", "splits", "tokenizer_dir") if k not in manifest]
    if missing:
        raise TrainError(f"{data_dir}/manifest.json lacks {missing}: re-run `aigc-ray preprocess`")
    if cfg.seq_len is not None and manifest["seq_len"] != cfg.seq_len:
        raise TrainError(
            f"train.seq_len ({cfg.seq_len}) must equal the shards' seq_len "
            f"({manifest['seq_len']}) in {data_dir}/manifest.json"
        )
    blocks = manifest["splits"]["train"]["blocks"]
    if blocks < cfg.batch_size * cfg.grad_accum * cfg.num_workers:
        raise TrainError(
            f"train.batch_size ({cfg.batch_size}) x train.num_workers ({cfg.num_workers}) "
            f"exceeds the {blocks} training blocks in {data_dir}"
        )
    return manifest


def plot_loss(history: list[dict], out: Path, ylabel: str = "cross-entropy (nats/token)") -> None:
    """loss.png. Drawn on a bare Figure, not pyplot: the process's matplotlib backend (e.g. a
    notebook's inline one) stays as it was."""
    from matplotlib.figure import Figure

    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def worker_cpus(cfg: TrainConfig, cluster_cpus: float) -> float:
    """CPUs to reserve per worker so that the workers fit in what is free now (a Serve replica
    may hold some). The ingest needs none of its own: each worker reads its shards on a thread
    (see feed.ShardReader). GPU runs keep the config."""
    need = cfg.num_workers * cfg.cpus_per_worker
    if cfg.use_gpu or cluster_cpus >= need:
        return cfg.cpus_per_worker
    fitted = max(0.1, round(cluster_cpus / cfg.num_workers, 2))
    log.warning(
        "train.cpus_per_worker %.2f -> %.2f so %d workers fit in %g free CPUs",
        cfg.cpus_per_worker,
        fitted,
        cfg.num_workers,
        cluster_cpus,
    )
    return fitted


def _torch_config(cfg):
    """NCCL on GPUs (Ray Train's default), gloo on CPUs; gloo also on the fake GPU nodes of
    `aigc-ray cluster local` (RAY_FAKE_CLUSTER=1), where the workers compute on CPU
    (engine.params.usable_device)."""
    from ray.train.torch import TorchConfig

    if cfg.use_gpu and os.environ.get(FAKE_CLUSTER_ENV) == "1":
        log.warning("fake GPU nodes (RAY_FAKE_CLUSTER=1): training on CPU over gloo")
        return TorchConfig(backend="gloo")
    return TorchConfig()


def run_trainer(loop, loop_config: dict, cfg, scaling: dict, progress: Progress, show, failed):
    """The one TorchTrainer set-up of text and image training: `cfg` is the stage's train
    section (name, run_dir, storage_path, use_gpu, max_failures, num_to_keep); `scaling` is
    the rest of ScalingConfig; rank 0 posts rows to the driver's board (`loop_config`'s
    "progress"), which `show` puts on `progress`; `failed(error)` says what a run that used up
    its restarts means (raised as TrainError)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller polls the workers every 2 s by default, so it saw the end of a run
    # (and each state change) up to 2 s late; a poll is one small RPC per worker. An explicit
    # setting in the environment wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    storage = storage_of(cfg)
    # on s3:// a filesystem whose every object carries the encryption header; Ray Train then
    # takes the path without its scheme
    filesystem, path = filesystem_for(storage) if storage.startswith("s3://") else (None, storage)
    with Watch(progress, show) as watch:
        trainer = TorchTrainer(
            loop,
            torch_config=_torch_config(cfg),
            train_loop_config={**loop_config, "progress": watch.board},
            scaling_config=ScalingConfig(use_gpu=cfg.use_gpu, **scaling),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=path,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            ),
        )
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainError(failed(e)) from e


def storage_of(cfg) -> str:
    """Where Ray Train keeps a run's checkpoints: train.storage_path, else run_dir/ray."""
    return cfg.storage_path or str(Path(cfg.run_dir).resolve() / "ray")


def fit(cfg: TrainConfig, model_cfg: ModelConfig, data_dir: str) -> TrainResult:
    """Train with a TorchTrainer; export the final model to `run_dir/model`; write metrics."""
    import ray

    manifest = preflight(cfg, model_cfg, data_dir)
    t0 = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    storage = storage_of(cfg)
    cpus = worker_cpus(cfg, ray.available_resources().get("CPU", 0))
    data_dir = portable_location(data_dir)
    columns = ["input_ids", "labels"] if manifest.get("format") == "sft" else ["input_ids"]
    rows = manifest["splits"]["train"]["blocks"]
    dp_plan = None
    if cfg.privacy.enabled:  # the noise for the budget: searched once, here, for every rank
        from aigc_ray.train import privacy

        dp_plan = privacy.plan(cfg, rows)
        log.info("DP-SGD: %s", dp_plan)

    def failed(e: Exception) -> str:
        last = None if is_uri(storage) else latest_complete_checkpoint(Path(storage) / cfg.name)
        return (
            f"training failed after train.max_failures={cfg.max_failures} restarts: "
            f"{str(e).splitlines()[0]}; last checkpoint: {last or 'none'} "
            f"(re-run with the same train.name to resume from it)"
        )

    # No Ray Data dataset: every rank reads the shards in the same seeded order itself and
    # takes positions p % world == rank, so a resume skips exactly what was consumed (see
    # feed.ShardReader and _Feed).
    result = run_trainer(
        train_loop_per_worker,
        {
            "train": cfg.model_dump(),
            "model": model_cfg.model_dump(),
            "data_dir": data_dir,
            "columns": columns,
            # a URI stays a URI: each worker copies it on its own node (see train_loop)
            "tokenizer_dir": portable_location(manifest["tokenizer_dir"]),
            "train_rows": rows,
            "privacy_plan": dp_plan.as_dict() if dp_plan else None,
        },
        cfg,
        {
            "num_workers": (cfg.min_workers, cfg.num_workers)
            if cfg.min_workers
            else cfg.num_workers,
            "resources_per_worker": {**cfg.worker_resources, "CPU": cpus},
            "elastic_resize_monitor_interval_s": cfg.elastic_resize_interval_s,
        },
        Progress("train", cfg.max_steps, "steps"),
        show_train_row,
        failed,
    )
    return _export(result.checkpoint, run_dir, cfg, model_cfg, time.time() - t0)


def show_train_row(progress: Progress, row: dict) -> None:
    """One logged row of rank 0 (metrics.jsonl's) on the driver's progress line."""
    fields = {"loss": row.get("loss"), "tokens/s": row.get("tokens_per_s")}
    if row.get("val_loss") is not None:
        fields["val loss"] = row["val_loss"]
    progress.update(row["step"], fields)


def _export(checkpoint, run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, secs: float):
    started = time.time()
    model_dir = run_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    checkpoint.to_directory(str(model_dir))
    history = [json.loads(line) for line in (model_dir / METRICS_FILE).read_text().splitlines()]
    saved = torch.load(model_dir / STATE_FILE, weights_only=False)
    ledger = saved.get("ledger") or []
    dp = _privacy_of(saved.get("privacy"))
    if ledger:
        (run_dir / "ledger.json").write_text(json.dumps(ledger))
    (model_dir / STATE_FILE).unlink()
    (model_dir / LORA_FILE).unlink(missing_ok=True)
    adapter = _export_adapter(model_dir, run_dir, model_cfg, cfg.seed)
    shutil.move(str(model_dir / METRICS_FILE), run_dir / METRICS_FILE)
    plot_loss(history, run_dir / "loss.png")
    write_resolved(cfg, run_dir, "train_config.resolved.json")
    write_resolved(model_cfg, run_dir, "model_config.resolved.json")
    losses = [r["loss"] for r in history if "loss" in r]
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    from transformers import AutoConfig

    n_params = count_params_from_config(AutoConfig.from_pretrained(str(model_dir)))
    rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][1:]
    _write_card(model_dir, cfg, history, dp)
    exported = copy_model_dir(model_dir, cfg.export_dir) if cfg.export_dir else None
    return TrainResult(
        str(model_dir),
        str(run_dir),
        history[-1]["step"],
        history[-1].get("tokens", 0),
        losses[0],
        losses[-1],
        vals[0] if vals else None,
        vals[-1] if len(vals) > 1 else None,
        round(secs, 1),
        n_params,
        round(float(np.mean(rates)), 1) if rates else 0.0,
        exported,
        round(time.time() - started, 2),
        dp,
        adapter,
    )


def _export_adapter(model_dir: Path, run_dir: Path, model_cfg: ModelConfig, seed: int):
    """A LoRA run's adapter leaves the (plain, merged) model directory for run_dir/adapter,
    its adapter_config.json naming the base it was trained over: model.pretrained, or the
    seeded random-init base, saved to run_dir/base. vLLM (`--enable-lora --lora-modules
    name=run_dir/adapter` over the base) and PeftModel.from_pretrained load it. None for a
    run without LoRA."""
    src = model_dir / ADAPTER_DIR
    if not src.is_dir():
        return None
    dest = run_dir / ADAPTER_DIR
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(str(src), dest)
    base = model_cfg.pretrained
    if not base:
        from aigc_ray.model import build_model, load_tokenizer

        tok = load_tokenizer(model_dir)
        base = str(run_dir / "base")
        shutil.rmtree(base, ignore_errors=True)
        build_model(model_cfg, tok, seed=seed).save_pretrained(base, safe_serialization=True)
        tok.save_pretrained(base)
    config_file = dest / "adapter_config.json"
    adapter_cfg = json.loads(config_file.read_text())
    adapter_cfg["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(adapter_cfg, indent=2))
    return str(dest)


def _privacy_of(saved: dict | None) -> dict | None:
    """The run's DP-SGD account from its last checkpoint (None without train.privacy)."""
    if not saved:
        return None
    return {
        **saved["plan"],
        "epsilon": saved["epsilon"],
        "steps": saved["steps"],
        "stopped": saved.get("stopped"),
    }


def _write_card(model_dir: Path, cfg: TrainConfig, history: list[dict], dp: dict | None) -> None:
    """The model card (README.md, as on the Hugging Face Hub): how the model was trained and,
    for a DP-SGD run, the privacy guarantee it carries."""
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    lines = [
        f"# {cfg.name}",
        "",
        "Trained with aigc_ray (Ray Train, "
        + ("DP-SGD with Opacus" if dp else cfg.strategy.upper())
        + f"): {history[-1]['step']} steps, {history[-1].get('tokens', 0):,} tokens.",
        "",
    ]
    if len(vals) > 1:
        lines += [f"Validation loss {vals[0]:.4f} -> {vals[-1]:.4f} (nats/token).", ""]
    if dp:
        from aigc_ray.train.privacy import model_card_section

        lines.append(model_card_section(dp))
    (model_dir / "README.md").write_text("\n".join(lines))


def count_params_from_config(conf) -> int:
    """Parameter count of a model config, without allocating weights."""
    from transformers import AutoModelForCausalLM

    from aigc_ray.model import count_params

    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(conf))
