"""Training faults on the shared Ray, four TorchTrainer runs in all:

- clean: an uninterrupted DDP run, the reference;
- fault: a DDP run with train.max_failures=0 whose worker is SIGKILLed after its first
  committed checkpoint, beside a half-written checkpoint directory planted in its storage: a
  clear error naming a complete checkpoint; then a re-run with the same name resumes from that
  checkpoint (never the half-written one) and ends where the clean run ends;
- fsdp: FSDP2 on gloo, a worker SIGKILLed and the group restarted automatically (FailureConfig).

The workers to kill are the RayTrainWorker actors under this session's own raylets, never
processes found by name across the machine.

(LoRA through the TorchTrainer, exported to object storage, is trained by test_stages.py.)"""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from raynodes import actor_pids

from aigc_ray.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, PER_STEP = 60, 2 * 4  # 2 workers x batch 4
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
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=5",
    "train.eval_every=30",
    "train.eval_batches=1",
    "train.warmup_steps=5",
    "train.shuffle_buffer=64",
    "train.ledger=true",
    # a kill lands after the first committed checkpoint, long before the run ends
    "train.step_delay_s=0.05",
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
    assert rows >= STEPS * PER_STEP, "corpus too small for 60 steps of 2 x 4 rows in one epoch"
    return cfg, root


def _train_cfg(cfg, root, name, **extra):
    return cfg.train.model_copy(update={"run_dir": str(root / name), "name": name, **extra})


def _workers() -> set[int]:
    """Pids of the live Ray Train workers (Train V2's RayTrainWorker actors) of this session's
    Ray, from the session's own worker logs. (Ray's state API is not served here: the session
    runs without the dashboard, and 2.60 then loads no state module.)"""
    import ray

    node = ray._private.worker.global_worker.node
    return set(actor_pids(node.get_logs_dir_path(), "RayTrainWorker"))


def _committed_step(storage: Path) -> int:
    """Step of the run's latest committed checkpoint (Ray Train's own snapshot), or 0."""
    try:
        snap = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        return snap["latest_checkpoint_result"]["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being written
        return 0


def _fit_killing_a_worker(cfg, train_cfg, before_kill=None) -> dict:
    """Run fit in a thread; SIGKILL one of *this run's* workers once its first checkpoint is
    committed, and record the workers started after the kill (a restart starts new ones).
    Returns {"result" or "error", "killed", "killed_at", "restarted"}."""
    from aigc_ray.train import fit

    box: dict = {}
    earlier = _workers()  # workers of other runs (none should be alive) are never touched

    def run():
        try:
            box["result"] = fit(train_cfg, cfg.model, cfg.data.output_dir)
        except Exception as e:  # re-raised in the test thread
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    storage = Path(train_cfg.run_dir) / "ray" / train_cfg.name
    deadline = time.time() + 240
    while time.time() < deadline and t.is_alive() and not _committed_step(storage):
        time.sleep(0.05)
    victims = sorted(_workers() - earlier)
    assert victims and t.is_alive(), (
        f"no worker of this run to kill before the run finished: {box.get('error')!r}"
    )
    if before_kill:
        before_kill(storage)
    box["killed"], box["killed_at"] = victims[-1], time.time()
    os.kill(victims[-1], signal.SIGKILL)
    seen = earlier | set(victims)
    box["restarted"] = set()
    while t.is_alive():
        box["restarted"] |= _workers() - seen
        t.join(timeout=0.2)
    return box


def _ledger(run_dir) -> list:
    return [tuple(x) for x in json.loads((Path(run_dir) / "ledger.json").read_text())]


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> dict:
    return {r["step"]: r.get("val_loss") or r.get("loss") for r in _rows(run_dir)}


def _assert_one_continuous_run(run_dir, train_cfg) -> list[dict]:
    """metrics.jsonl of a run that was interrupted and resumed reads like one uninterrupted run:
    every logged step once, in order; lr on the schedule at each; the optimizer's own step count
    equal to the step (its state was restored, not started afresh); every position once."""
    from aigc_ray.train import lr_factor

    rows = _rows(run_dir)
    c = train_cfg
    logged = [
        s
        for s in range(1, c.max_steps + 1)
        if s % 10 == 0 or s % c.checkpoint_every == 0 or s % c.eval_every == 0
    ]
    assert [r["step"] for r in rows] == [0, *logged]
    for r in rows[1:]:
        want = c.lr * lr_factor(r["step"], c.warmup_steps, c.max_steps, c.min_lr_ratio, c.schedule)
        assert math.isclose(r["lr"], want, rel_tol=1e-9), (r["step"], r["lr"], want)
        assert r["optimizer_step"] == r["step"], f"optimizer state lost: {r}"
        assert r["tokens"] == r["step"] * PER_STEP * c.seq_len
    ledger = _ledger(run_dir)
    assert len(ledger) == len(set(ledger)), "a sample was repeated"
    assert sorted(ledger) == [(0, p) for p in range(c.max_steps * PER_STEP)], "a sample skipped"
    return rows


@pytest.fixture(scope="module")
def clean(data_cfg):
    """An uninterrupted DDP run: the reference for the fault and FSDP runs."""
    from aigc_ray.train import fit

    cfg, root = data_cfg
    return fit(_train_cfg(cfg, root, "clean"), cfg.model, cfg.data.output_dir)


@pytest.fixture(scope="module")
def fault(data_cfg):
    """max_failures=0: a worker SIGKILLed after the first committed checkpoint ends the run with
    an error; a half-written checkpoint directory (named to sort last) is planted first. Then a
    re-run with the same name and storage resumes."""
    from aigc_ray.train import fit

    cfg, root = data_cfg
    train_cfg = _train_cfg(cfg, root, "fault", max_failures=0)

    def plant(storage: Path):
        bogus = storage / "checkpoint_2999-01-01_00-00-00.000000"
        bogus.mkdir()
        (bogus / "config.json").write_text("{truncated")
        (bogus / "train_state.pt").write_bytes(b"")

    box = _fit_killing_a_worker(cfg, train_cfg, before_kill=plant)
    # the checkpoint the error names is read now: the re-run below keeps only the newest
    # checkpoints (train.num_to_keep) and may delete it
    err = box.get("error")
    if err is not None and "last checkpoint: " in str(err):
        from transformers import AutoModelForCausalLM

        box["named"] = str(err).split("last checkpoint: ")[1].split()[0]
        try:
            box["named_model"] = AutoModelForCausalLM.from_pretrained(box["named"])
        except Exception as e:  # asserted in the test
            box["named_model"] = e
    again = train_cfg.model_copy(update={"max_failures": 2})
    box["resumed"] = fit(again, cfg.model, cfg.data.output_dir)
    box["cfg"] = again
    return box


def test_exceeding_max_failures_is_a_clear_error_naming_a_complete_checkpoint(fault):
    from transformers import PreTrainedModel

    from aigc_ray.train import TrainError

    killed = fault["killed"]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    err = fault.get("error")
    assert isinstance(err, TrainError), err
    assert "max_failures=0" in str(err) and "last checkpoint" in str(err)
    assert "2999" not in fault["named"], "the half-written checkpoint was named to resume from"
    model = fault["named_model"]
    assert isinstance(model, PreTrainedModel), f"{fault['named']} does not load: {model!r}"
    assert model.config.hidden_size == 64


def test_rerun_resumes_from_the_committed_checkpoint_exactly_once_with_the_same_loss(fault, clean):
    """The re-run continues the failed run (its rows from before the kill are kept; step 0 is
    not evaluated again), never reads the half-written checkpoint, consumes every position
    once in the clean run's order and ends within 0.5% of the clean run's loss."""
    resumed = fault["resumed"]
    assert resumed.steps == clean.steps == STEPS
    assert abs(resumed.last_loss - clean.last_loss) <= 0.005 * clean.last_loss, (
        resumed.last_loss,
        clean.last_loss,
    )
    _assert_one_continuous_run(clean.run_dir, fault["cfg"])
    rows = _assert_one_continuous_run(resumed.run_dir, fault["cfg"])
    before = [r["step"] for r in rows if r.get("time", math.inf) < fault["killed_at"]]
    assert before and before[-1] >= 5, "the re-run started over instead of resuming"
    assert [r["step"] for r in rows].count(0) == 1
    assert _ledger(resumed.run_dir) == _ledger(clean.run_dir)


def test_fsdp2_on_gloo_resumes_exactly_once_and_matches_ddp(data_cfg, clean):
    """train.strategy=fsdp: FSDP2 fully_shard over 2 CPU workers (gloo). A worker is killed after
    the first committed checkpoint; the group restarts on its own (FailureConfig), resumes from
    the gathered full checkpoint with its optimizer state, consumes every position once,
    evaluates exactly as DDP at step 0 (same init, same rows), follows DDP's loss curve, and
    exports a plain Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, root = data_cfg
    train_cfg = _train_cfg(cfg, root, "fsdp", strategy="fsdp")
    box = _fit_killing_a_worker(cfg, train_cfg)
    assert "error" not in box, box.get("error")
    assert box["restarted"], "no new worker group started after the kill"
    run = box["result"]
    assert run.steps == STEPS
    ddp, fsdp = _losses(clean.run_dir), _losses(run.run_dir)
    assert abs(fsdp[0] - ddp[0]) <= 1e-5, (fsdp[0], ddp[0])
    _assert_one_continuous_run(run.run_dir, train_cfg)
    # after training (identical to the last digit on this machine; reductions may reorder)
    for step in (30, 60):
        assert abs(fsdp[step] - ddp[step]) <= 0.005 * ddp[step], (step, fsdp[step], ddp[step])
    assert abs(run.last_loss - clean.last_loss) <= 0.005 * clean.last_loss
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert not type(model).__name__.startswith("FSDP")
    assert not model.config.architectures[0].startswith("FSDP")
    with torch.no_grad():  # a trained model: far below the uniform-guess loss ln(512) = 6.24
        ids = torch.randint(0, 512, (2, 32))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert run.val_loss_final < 6.0


def test_dp_sgd_on_two_ddp_workers_keeps_its_epsilon_across_a_killed_worker(data_cfg):
    """train.privacy (DP-SGD with Opacus) on the two DDP workers: a worker is SIGKILLed after
    the first committed checkpoint and the group restarts from it (FailureConfig). The run
    logs epsilon after every step, and each equals Opacus' own RDP accountant run here for the
    sample rate computed from the shards (rows per step / training rows), the run's noise and
    that many steps (within 1%): the resumed run went on from the checkpointed accountant,
    as if never interrupted. It ends at most at target_epsilon, lowers the validation loss,
    draws each step's rows by the seeded Poisson rule (the ledger, checked against it), and its
    summary and model card state the guarantee."""
    import numpy as np
    from opacus.accountants import RDPAccountant

    from aigc_ray.config import DPConfig
    from aigc_ray.train.privacy import SAMPLE_STREAM

    cfg, root = data_cfg
    target = 8.0
    train_cfg = _train_cfg(
        cfg,
        root,
        "dp",
        privacy=DPConfig(enabled=True, target_epsilon=target, max_grad_norm=1.0),
        eval_every=STEPS,
    )
    box = _fit_killing_a_worker(cfg, train_cfg)
    assert "error" not in box, box.get("error")
    assert box["restarted"], "no new worker group started after the kill"
    run = box["result"]
    print(run.summary())
    n = json.loads((root / "data" / "manifest.json").read_text())["splits"]["train"]["blocks"]
    q = PER_STEP / n
    dp = run.privacy
    assert dp["sample_rate"] == pytest.approx(q) and dp["delta"] == pytest.approx(1 / n)
    rows = _rows(run.run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS + 1)), "a step logged twice or never"
    before = [r["step"] for r in rows if r.get("time", math.inf) < box["killed_at"]]
    assert before and before[-1] >= 5, "the run started over instead of resuming"
    for r in rows:
        acc = RDPAccountant()
        acc.history = [(dp["noise_multiplier"], q, r["step"])] if r["step"] else []
        want = acc.get_epsilon(delta=1 / n) if r["step"] else 0.0
        assert r["epsilon"] == pytest.approx(want, rel=0.01, abs=1e-9), (r["step"], want)
    assert rows[-1]["epsilon"] <= target and rows[-1]["epsilon"] == pytest.approx(target, rel=0.01)
    assert dp["epsilon"] == pytest.approx(rows[-1]["epsilon"], rel=1e-6) and dp["steps"] == STEPS
    assert run.val_loss_final < run.val_loss_initial - 0.05, (
        run.val_loss_initial,
        run.val_loss_final,
    )
    ledger = _ledger(run.run_dir)
    assert len(ledger) == len(set(ledger))
    for step in range(1, STEPS + 1):
        rng = np.random.default_rng([cfg.train.seed, SAMPLE_STREAM, step - 1])
        drawn = np.flatnonzero(rng.random(n) < q).tolist()
        assert sorted(p for s, p in ledger if s == step) == drawn, f"step {step}'s rows"
    assert f"({dp['epsilon']:.3f}, " in run.summary()
    card = (Path(run.model_dir) / "README.md").read_text()
    assert "DP-SGD" in card and f"{dp['noise_multiplier']:.6g}" in card
