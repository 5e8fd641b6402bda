"""Unit tests for aigc_ray.train's pure pieces (no Ray): schedule, optimizer, steps, preflight."""

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aigc_ray.config import ModelConfig, TrainConfig
from aigc_ray.model import check_model_dir, count_params
from aigc_ray.train import (
    METRICS_FILE,
    STATE_FILE,
    TrainError,
    build_optimizer,
    build_scheduler,
    collate,
    count_params_from_config,
    eval_loss_sum,
    load_val_batches,
    lr_factor,
    preflight,
    to_tensor,
    train_step,
    worker_cpus,
)
from aigc_ray.train.fit import _export
from aigc_ray.train.loop import _save_checkpoint, _State, all_mean
from aigc_ray.train.steps import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- schedule


def test_lr_factor_warmup_is_linear():
    warmup = 10
    got = [lr_factor(s, warmup, 100, 0.1) for s in range(warmup)]
    assert got == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert got[0] == pytest.approx(0.1)
    assert got[-1] == pytest.approx(1.0)


def test_lr_factor_peak_after_warmup_and_min_at_total():
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)  # cosine midpoint
    assert lr_factor(500, 10, 100, 0.25) == pytest.approx(0.25)  # clamped past the end


def test_lr_factor_monotone_after_warmup():
    vals = [lr_factor(s, 20, 200, 0.1) for s in range(20, 201)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    assert vals[0] > vals[-1]
    assert all(0.1 - 1e-12 <= v <= 1.0 + 1e-12 for v in vals)


def test_lr_factor_without_warmup():
    assert lr_factor(0, 0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 0, 10, 0.1) == pytest.approx(0.1)


def test_scheduler_applies_lr_factor():
    cfg = TrainConfig(lr=0.01, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer(torch.nn.ParameterList([p]), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(21):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01 / 4)
    assert lrs[3] == pytest.approx(0.01)
    assert lrs[20] == pytest.approx(0.001)


# ---------------------------------------------------------------- optimizer


def test_build_optimizer_groups(tiny_model):
    cfg = TrainConfig(weight_decay=0.05, lr=3e-3)
    opt = build_optimizer(tiny_model, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == pytest.approx(0.05)
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    # every norm weight is excluded from decay, every projection matrix is decayed
    for name, p in tiny_model.named_parameters():
        if "norm" in name:
            assert id(p) in no_decay_ids, name
        if name.endswith("proj.weight") or "embed_tokens" in name:
            assert id(p) in decay_ids, name
    assert len(decay_ids) + len(no_decay_ids) == len(list(tiny_model.parameters()))
    # 2 layers x 2 norms + final norm
    assert len(no_decay_ids) == 5
    assert opt.defaults["lr"] == pytest.approx(3e-3)


def test_build_optimizer_skips_frozen(tiny_model):
    tiny_model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(tiny_model, TrainConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(tiny_model.model.embed_tokens.weight) not in ids


# ---------------------------------------------------------------- steps


def test_train_step_lowers_loss(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=25, weight_decay=0.0)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg)
    ids = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in tiny_model.parameters()]
    losses, norms = [], []
    for _ in range(25):
        loss, norm = train_step(tiny_model, ids, opt, sched, grad_clip=1.0)
        losses.append(loss)
        norms.append(norm)
    assert all(math.isfinite(x) for x in losses + norms)
    assert all(n > 0 for n in norms)
    assert losses[-1] < losses[0] - 1.0, losses
    assert tiny_model.training
    assert sched.last_epoch == 25
    assert all(p.grad is None for p in tiny_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))


def test_optimizer_steps_counts_adamw_steps_and_survives_a_state_dict(tiny_model, tiny_tokenizer):
    """metrics.jsonl's optimizer_step: AdamW's own count, carried by its state dict; a fresh
    optimizer (state lost on a resume) starts again from 0."""
    from aigc_ray.train.loop import optimizer_steps

    cfg = TrainConfig(lr=1e-3, warmup_steps=0)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg)
    assert optimizer_steps(opt) == 0
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        train_step(tiny_model, ids, opt, sched, grad_clip=1.0)
    assert optimizer_steps(opt) == 3
    restored = build_optimizer(tiny_model, cfg)
    restored.load_state_dict(opt.state_dict())
    assert optimizer_steps(restored) == 3
    assert optimizer_steps(build_optimizer(tiny_model, cfg)) == 0


def test_train_step_reports_unclipped_norm(tiny_model, tiny_tokenizer):
    cfg = TrainConfig(lr=1e-3, warmup_steps=0)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(2))
    _, norm = train_step(tiny_model, ids, opt, sched, grad_clip=1e-6)
    assert norm > 1e-3  # the norm before clipping, not the clipped one


def test_eval_loss_sum_matches_manual(tiny_model, tiny_tokenizer):
    g = torch.Generator().manual_seed(3)
    vocab = len(tiny_tokenizer)
    batches = [
        torch.randint(0, vocab, (2, 12), generator=g),
        torch.randint(0, vocab, (3, 8), generator=g),
    ]
    total, count = eval_loss_sum(tiny_model, batches)
    assert not tiny_model.training
    manual_total, manual_count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = tiny_model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            manual_total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), targets.reshape(-1), reduction="sum"
            ).item()
            manual_count += targets.numel()
    assert count == manual_count == 2 * 11 + 3 * 7
    assert total == pytest.approx(manual_total, rel=1e-4)


def test_eval_loss_sum_ignores_masked_labels(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :6] = -100  # an SFT prompt: no loss on it
    total, count = eval_loss_sum(tiny_model, [(ids, labels)])
    assert count == 2 * 4
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[:, :-1].float()
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    ).item()
    assert total == pytest.approx(manual, rel=1e-4)
    full_total, full_count = eval_loss_sum(tiny_model, [ids])
    assert full_count == 2 * 9 and full_total != pytest.approx(total)
    # a batch whose labels are all ignored contributes nothing (and no NaN)
    assert eval_loss_sum(tiny_model, [(ids, torch.full_like(ids, -100))]) == (0.0, 0)


def test_train_step_with_labels_only_learns_unmasked(tiny_model, tiny_tokenizer):
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=10)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :8] = -100
    first, _ = train_step(tiny_model, ids, opt, sched, 1.0, labels)
    for _ in range(9):
        last, norm = train_step(tiny_model, ids, opt, sched, 1.0, labels)
    assert math.isfinite(norm)
    assert last < first - 0.5


def test_eval_empty():
    assert eval_loss_sum(torch.nn.Identity(), []) == (0.0, 0)
    assert evaluate(torch.nn.Identity(), [], "cpu") is None


def test_all_mean_without_process_group():
    assert all_mean([1.5, 2.0], "cpu") == [1.5, 2.0]


def test_to_tensor_stacks_object_array():
    col = np.empty(3, dtype=object)
    for i in range(3):
        col[i] = np.arange(i * 4, i * 4 + 4, dtype=np.int32)
    t = to_tensor({"input_ids": col})
    assert t.dtype == torch.int64
    assert t.shape == (3, 4)
    assert t.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    col2 = np.empty(2, dtype=object)
    col2[0], col2[1] = [1, 2], [3, 4]
    assert to_tensor({"input_ids": col2}).tolist() == [[1, 2], [3, 4]]


def test_collate_with_and_without_labels():
    col = np.empty(2, dtype=object)
    col[0], col[1] = np.array([1, 2], np.int32), np.array([3, 4], np.int32)
    lab = np.empty(2, dtype=object)
    lab[0], lab[1] = np.array([-100, 2], np.int32), np.array([-100, 4], np.int32)
    ids, labels = collate({"input_ids": col, "labels": lab})
    assert ids.tolist() == [[1, 2], [3, 4]]
    assert labels.dtype == torch.int64 and labels.tolist() == [[-100, 2], [-100, 4]]
    ids, labels = collate({"input_ids": col})
    assert labels is None and ids.shape == (2, 2)


# ---------------------------------------------------------------- validation batches


def write_val(data_dir, n_rows: int, seq_len: int = 4, shards: int = 2):
    val = data_dir / "val"
    val.mkdir(parents=True)
    rows = [[i] * seq_len for i in range(n_rows)]
    per = math.ceil(n_rows / shards)
    for s in range(shards):
        chunk = rows[s * per : (s + 1) * per]
        arr = pa.array(chunk, pa.list_(pa.int32()))
        pq.write_table(pa.table({"input_ids": arr}), val / f"part-{s}.parquet")
    return rows


def test_load_val_batches_slices_by_rank(tmp_path):
    write_val(tmp_path, 11)
    seen = []
    for rank in range(2):
        batches = load_val_batches(str(tmp_path), rank, 2, batch_size=2, n_batches=10)
        assert all(b.dtype == torch.int64 and b.shape[1] == 4 for b in batches)
        assert all(b.shape[0] <= 2 for b in batches)
        firsts = [r[0] for b in batches for r in b.tolist()]
        seen.append(firsts)
    assert not set(seen[0]) & set(seen[1])
    # the same row count on every rank (FSDP ranks must run the same forward passes): the odd
    # last row is left out
    assert sorted(seen[0] + seen[1]) == list(range(10))
    assert len(seen[0]) == len(seen[1]) == 5


def test_load_val_batches_limits_count(tmp_path):
    write_val(tmp_path, 20)
    batches = load_val_batches(str(tmp_path), 1, 2, batch_size=3, n_batches=2)
    assert [b.shape[0] for b in batches] == [3, 3]
    assert [r[0] for b in batches for r in b.tolist()] == [1, 3, 5, 7, 9, 11]


def test_load_val_batches_with_labels(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    ids = pa.array([[i, i + 1, i + 2] for i in range(5)], pa.list_(pa.int32()))
    labels = pa.array([[-100, i + 1, i + 2] for i in range(5)], pa.list_(pa.int32()))
    pq.write_table(pa.table({"input_ids": ids, "labels": labels}), val / "part-0.parquet")
    batches = load_val_batches(str(tmp_path), 0, 1, batch_size=2, n_batches=5)
    assert len(batches) == 3
    assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    b_ids, b_labels = batches[0]
    assert b_ids.tolist() == [[0, 1, 2], [1, 2, 3]]
    assert b_labels.tolist() == [[-100, 1, 2], [-100, 2, 3]]


def test_load_val_batches_without_val(tmp_path):
    assert load_val_batches(str(tmp_path), 0, 1, 2, 2) == []
    (tmp_path / "val").mkdir()
    assert load_val_batches(str(tmp_path), 0, 1, 2, 2) == []


# ---------------------------------------------------------------- preflight


def write_manifest(d, seq_len=32, train_blocks=10):
    d.mkdir(parents=True, exist_ok=True)
    m = {
        "seq_len": seq_len,
        "tokenizer_dir": str(d / "tokenizer"),
        "splits": {"train": {"blocks": train_blocks}, "val": {"blocks": 1}},
    }
    (d / "manifest.json").write_text(json.dumps(m))
    return m


def test_preflight_ok(tmp_path):
    m = write_manifest(tmp_path, seq_len=32, train_blocks=8)
    cfg = TrainConfig(seq_len=32, batch_size=4, num_workers=2)
    assert preflight(cfg, ModelConfig(), str(tmp_path)) == m


def test_preflight_seq_len_mismatch(tmp_path):
    write_manifest(tmp_path, seq_len=64)
    with pytest.raises(TrainError, match=r"train\.seq_len") as ei:
        preflight(TrainConfig(seq_len=32, batch_size=1), ModelConfig(), str(tmp_path))
    assert "64" in str(ei.value) and "32" in str(ei.value)


def test_preflight_too_few_blocks(tmp_path):
    write_manifest(tmp_path, seq_len=32, train_blocks=7)
    cfg = TrainConfig(seq_len=32, batch_size=4, num_workers=2)
    with pytest.raises(TrainError, match=r"batch_size") as ei:
        preflight(cfg, ModelConfig(), str(tmp_path))
    assert "7" in str(ei.value)


def test_preflight_missing_manifest(tmp_path):
    d = tmp_path / "shards"
    with pytest.raises(TrainError) as ei:
        preflight(TrainConfig(), ModelConfig(), str(d))
    assert str(d) in str(ei.value)
    assert "train.data_dir" in str(ei.value)


def test_preflight_bad_pretrained(tmp_path):
    from aigc_ray.model import ModelDirError

    write_manifest(tmp_path, seq_len=32)
    bad = tmp_path / "not-a-model"
    with pytest.raises(ModelDirError):
        preflight(
            TrainConfig(seq_len=32, batch_size=1), ModelConfig(pretrained=str(bad)), str(tmp_path)
        )


# ---------------------------------------------------------------- resources


def test_worker_cpus_fit_what_is_free():
    cfg = TrainConfig(num_workers=2, cpus_per_worker=1.0)
    assert worker_cpus(cfg, 2) == 1.0  # the ingest runs in the workers: no CPU set aside
    assert worker_cpus(cfg, 1.5) == 0.75  # a replica holds half a CPU


def test_worker_cpus_keeps_config_when_it_fits_or_on_gpu():
    assert worker_cpus(TrainConfig(num_workers=2, cpus_per_worker=1.0), 8) == 1.0
    assert worker_cpus(TrainConfig(num_workers=2, cpus_per_worker=1.5), 4) == 1.5
    assert worker_cpus(TrainConfig(num_workers=2, cpus_per_worker=1.0, use_gpu=True), 1) == 1.0


def test_worker_cpus_never_zero():
    assert worker_cpus(TrainConfig(num_workers=4, cpus_per_worker=1.0), 1) > 0


def test_count_params_from_config_matches_instantiation(tiny_model):
    assert count_params_from_config(tiny_model.config) == count_params(tiny_model)


# ---------------------------------------------------------------- checkpoint format and export


class DirCheckpoint:
    """Stands in for ray.train.Checkpoint: to_directory copies a local directory."""

    def __init__(self, path):
        self.path = path

    def to_directory(self, dest):
        shutil.copytree(self.path, dest)


def test_checkpoint_is_a_model_dir_and_exports(tmp_path, tiny_model, tiny_tokenizer):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), max_steps=20)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg)
    history = [
        {"step": 0, "val_loss": 6.0},
        {"step": 10, "loss": 5.5, "tokens": 100},
        {"step": 20, "loss": 4.0, "tokens": 200, "val_loss": 4.5},
    ]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _save_checkpoint(
        tiny_model,
        tiny_tokenizer,
        opt.state_dict(),
        None,
        sched,
        _State(20, 200, history),
        str(ckpt),
    )
    check_model_dir(ckpt)
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert state["step"] == 20 and state["tokens"] == 200
    assert [json.loads(x) for x in (ckpt / METRICS_FILE).read_text().splitlines()] == history

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    r = _export(DirCheckpoint(ckpt), run_dir, cfg, ModelConfig(), 12.34)
    model_dir = run_dir / "model"
    check_model_dir(model_dir)
    assert not (model_dir / STATE_FILE).exists()
    assert (run_dir / METRICS_FILE).is_file()
    assert (run_dir / "loss.png").stat().st_size > 0
    assert (r.steps, r.tokens, r.first_loss, r.last_loss) == (20, 200, 5.5, 4.0)
    assert (r.val_loss_initial, r.val_loss_final) == (6.0, 4.5)
    assert r.params == count_params(tiny_model)
    assert r.seconds == 12.3
