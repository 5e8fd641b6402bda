"""Training faults on the shared Ray: SIGKILL a worker mid-run (automatic resume, exactly-once
ledger, same final loss), max_failures exceeded (clear error, checkpoint intact), and a
half-written checkpoint directory that must never be resumed from."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from aigc_ray.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = [
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.seq_len=64",
    "data.val_fraction=0.1",
    "data.near_dedup=false",
    "data.batch_size=32",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=128",
    "train.batch_size=4",
    "train.max_steps=60",
    "train.checkpoint_every=5",
    "train.eval_every=30",
    "train.eval_batches=1",
    "train.warmup_steps=5",
    "train.shuffle_buffer=64",
    "train.ledger=true",
]


@pytest.fixture(scope="module")
def data_cfg(ray_session, tmp_path_factory):
    from aigc_ray.data import run_preprocess

    root = tmp_path_factory.mktemp("faults")
    cfg = load_config(
        "configs/tiny.yaml", [*OVERRIDES, f"data.output_dir={root / 'data'}", "data.max_docs=150"]
    )
    m = run_preprocess(cfg.data)
    rows = m["splits"]["train"]["blocks"]
    assert rows >= 60 * 8, "corpus too small for 60 steps of 2 x 4 rows in one epoch"
    return cfg, root


def _train_cfg(cfg, root, name, **extra):
    return cfg.train.model_copy(update={"run_dir": str(root / name), "name": name, **extra})


def _workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            out.append(p)
    return out


def _fit_killing_a_worker(cfg, root, train_cfg):
    """Run fit in a thread; SIGKILL one of *this run's* workers right after its first
    checkpoint lands, and record every worker process the run starts (a restart starts new
    ones). Returns (box, killed pid, pids of workers started after the kill)."""
    from aigc_ray.train import fit

    box: dict = {}
    earlier = {p.pid for p in _workers()}  # other runs' workers are never touched

    def run():
        try:
            box["result"] = fit(train_cfg, cfg.model, cfg.data.output_dir)
        except Exception as e:  # re-raised in the test thread
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    storage = Path(train_cfg.run_dir) / "ray" / train_cfg.name
    deadline = time.time() + 240
    while time.time() < deadline and not list(storage.glob("checkpoint_*/train_state.pt")):
        time.sleep(0.05)
    victims = [w for w in _workers() if w.pid not in earlier]
    assert victims and t.is_alive(), "no worker of this run to kill before the run finished"
    killed = victims[-1].pid
    os.kill(killed, signal.SIGKILL)
    before_kill = earlier | {w.pid for w in victims}
    restarted: set[int] = set()
    while t.is_alive():
        restarted |= {w.pid for w in _workers()} - before_kill
        t.join(timeout=0.2)
    return box, killed, restarted


def _ledger(run_dir) -> list:
    return [tuple(x) for x in json.loads((Path(run_dir) / "ledger.json").read_text())]


@pytest.fixture(scope="module")
def clean(data_cfg):
    """An uninterrupted DDP run: the reference for the fault and FSDP runs."""
    from aigc_ray.train import fit

    cfg, root = data_cfg
    return fit(_train_cfg(cfg, root, "clean"), cfg.model, cfg.data.output_dir)


def _losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("val_loss") or r.get("loss") for r in rows}


def test_sigkill_worker_resumes_exactly_once_with_same_loss(data_cfg, clean):
    cfg, root = data_cfg
    box, killed, restarted = _fit_killing_a_worker(cfg, root, _train_cfg(cfg, root, "fault"))
    assert "error" not in box, box.get("error")
    assert restarted, "no new worker group started after the kill: nothing was recovered"
    faulty = box["result"]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert faulty.steps == clean.steps == 60
    assert abs(faulty.last_loss - clean.last_loss) <= 0.02 * clean.last_loss
    ledger_clean, ledger_fault = _ledger(clean.run_dir), _ledger(faulty.run_dir)
    assert len(ledger_fault) == len(set(ledger_fault)) == 60 * 2 * 4, "a sample was repeated"
    assert sorted(ledger_fault) == [(0, p) for p in range(60 * 8)], "a sample was skipped"
    assert ledger_fault == ledger_clean


def test_fsdp2_on_gloo_resumes_exactly_once_and_matches_ddp(data_cfg, clean):
    """train.strategy=fsdp: FSDP2 fully_shard over 2 CPU workers (gloo). A worker is killed after
    the first checkpoint; the run resumes from the gathered full checkpoint, consumes every
    position once, follows DDP's loss curve, and exports a plain Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, root = data_cfg
    box, _, restarted = _fit_killing_a_worker(
        cfg, root, _train_cfg(cfg, root, "fsdp", strategy="fsdp")
    )
    assert "error" not in box, box.get("error")
    assert restarted, "no new worker group started after the kill"
    run = box["result"]
    assert run.steps == 60
    ledger = _ledger(run.run_dir)
    assert sorted(ledger) == [(0, p) for p in range(60 * 8)] and len(ledger) == len(set(ledger))
    ddp, fsdp = _losses(clean.run_dir), _losses(run.run_dir)
    for step in (0, 30, 60):  # evaluations: the same model on the same validation rows
        assert abs(fsdp[step] - ddp[step]) <= 0.02 * ddp[step], (step, fsdp[step], ddp[step])
    assert abs(run.last_loss - clean.last_loss) <= 0.02 * clean.last_loss
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert not type(model).__name__.startswith("FSDP")
    assert not model.config.architectures[0].startswith("FSDP")
    with torch.no_grad():  # a trained model: far below the uniform-guess loss ln(512) = 6.24
        ids = torch.randint(0, 512, (2, 32))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert run.val_loss_final < 6.0


def test_exceeding_max_failures_is_a_clear_error_with_a_loadable_checkpoint(data_cfg):
    from transformers import AutoModelForCausalLM

    from aigc_ray.train import TrainError

    cfg, root = data_cfg
    box, _, _ = _fit_killing_a_worker(cfg, root, _train_cfg(cfg, root, "fatal", max_failures=0))
    err = box.get("error")
    assert isinstance(err, TrainError), err
    assert "max_failures" in str(err) and "last checkpoint" in str(err)
    ckpt = str(err).split("last checkpoint: ")[1].split()[0]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.hidden_size == 64


def test_half_written_checkpoint_is_never_resumed(data_cfg):
    from aigc_ray.train import fit

    cfg, root = data_cfg
    first = _train_cfg(cfg, root, "partial", max_steps=10)
    fit(first, cfg.model, cfg.data.output_dir)
    bogus = Path(first.run_dir) / "ray" / "partial" / "checkpoint_2999-01-01_00-00-00.000000"
    bogus.mkdir()
    (bogus / "config.json").write_text("{truncated")
    again = fit(first.model_copy(update={"max_steps": 15}), cfg.model, cfg.data.output_dir)
    rows = [json.loads(x) for x in (Path(first.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert again.steps == 15 and [r["step"] for r in rows].count(10) == 1
    assert len(_ledger(first.run_dir)) == 15 * 8


def test_lora_run_exports_a_merged_plain_model(data_cfg, s3_server):
    """LoRA through the real TorchTrainer: adapters train, the export is a plain merged model,
    also copied to train.export_dir in object storage (moto S3) for other nodes to serve."""
    from transformers import AutoModelForCausalLM

    from aigc_ray.model import check_model_dir
    from aigc_ray.train import fit

    cfg, root = data_cfg
    model_cfg = cfg.model.model_copy(update={"lora_r": 4})
    export = "s3://aigc-test/runs/lora/model"
    r = fit(
        _train_cfg(
            cfg, root, "lora", max_steps=8, eval_every=8, ledger=False, lr=0.01, export_dir=export
        ),
        model_cfg,
        cfg.data.output_dir,
    )
    assert r.exported_to == r.serving_dir == export and f"exported   {export}" in r.summary()
    keys = {
        o["Key"]
        for o in s3_server.list_objects_v2(Bucket="aigc-test", Prefix="runs/lora/model/")[
            "Contents"
        ]
    }
    local = {f"runs/lora/model/{p.name}" for p in Path(r.model_dir).iterdir()}
    assert keys - {"runs/lora/model/"} == local  # (pyarrow may leave a directory marker)
    check_model_dir(export)
    files = {p.name for p in Path(r.model_dir).iterdir()}
    assert "config.json" in files and not any("adapter" in f for f in files)
    model = AutoModelForCausalLM.from_pretrained(r.model_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert r.val_loss_final < r.val_loss_initial
