"""Exactly-once positions, gradient accumulation and precision selection (no Ray)."""

import copy

import numpy as np
import pytest
import torch

from aigc_ray.config import TrainConfig
from aigc_ray.train import (
    accumulate_step,
    build_optimizer,
    build_scheduler,
    lr_factor,
    precision,
    rank_micro_batches,
)


def _stream(n_rows, seq=4, chunk=7):
    ids = np.arange(n_rows * seq).reshape(n_rows, seq)
    for i in range(0, n_rows, chunk):
        yield {"input_ids": list(ids[i : i + chunk])}


def _positions(rank, world, start, limit, batch, n_rows=100):
    out = []
    for pos, ids, labels in rank_micro_batches(_stream(n_rows), rank, world, start, limit, batch):
        assert ids.shape == (batch, 4) and labels is None
        assert (ids[:, 0].numpy() // 4 == pos).all(), "row content must match its position"
        out += pos.tolist()
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_the_epoch_exactly(world):
    batch, limit = 4, 96 // (4 * world) * 4 * world
    seen = [p for r in range(world) for p in _positions(r, world, 0, limit, batch)]
    assert sorted(seen) == list(range(limit))


def test_resume_skips_exactly_the_consumed_positions():
    world, batch = 2, 4
    per_step = world * batch
    limit = 96
    first = [p for r in range(world) for p in _positions(r, world, 0, limit, batch)[: 3 * batch]]
    rest = [p for r in range(world) for p in _positions(r, world, 3 * per_step, limit, batch)]
    assert sorted(first + rest) == list(range(limit))
    assert not set(first) & set(rest)


def test_probe_digest_is_rank_independent():
    probes = []
    for rank in (0, 1):
        probe = []
        next(rank_micro_batches(_stream(50), rank, 2, 0, 48, 4, probe))
        probes.append(probe[0])
    assert probes[0] == probes[1]


def test_grad_accumulation_equals_one_big_batch(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (4, 16))
    cfg = TrainConfig(lr=1e-2, warmup_steps=0)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    opt_a, opt_b = build_optimizer(a, cfg), build_optimizer(b, cfg)
    loss_a, _ = accumulate_step(a, [(ids, None)], opt_a, build_scheduler(opt_a, cfg), 1e9)
    loss_b, _ = accumulate_step(
        b, [(ids[:2], None), (ids[2:], None)], opt_b, build_scheduler(opt_b, cfg), 1e9
    )
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for pa_, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa_, pb, rtol=1e-4, atol=1e-5)


def test_precision_is_fp32_on_cpu_and_autocast_on_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert precision(TrainConfig(precision="bf16"), cpu) == (None, None)
    assert precision(TrainConfig(precision="bf16"), gpu) == (torch.bfloat16, None)
    assert precision(TrainConfig(precision="fp32"), gpu) == (None, None)


def test_linear_schedule_reaches_min_ratio():
    assert lr_factor(10, 0, 10, 0.1, "linear") == pytest.approx(0.1)
    assert lr_factor(5, 0, 10, 0.0, "linear") == pytest.approx(0.5)


def test_lora_checkpoint_is_plain_hf_and_resumes_adapters(tiny_model_cfg, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from aigc_ray.model import is_lora
    from aigc_ray.train import new_model, restore_model, save_model, train_step

    cfg = tiny_model_cfg.model_copy(update={"lora_r": 4})
    model = new_model(cfg, tiny_tokenizer, seed=3)
    tcfg = TrainConfig(lr=2e-2, warmup_steps=0)
    opt = build_optimizer(model, tcfg)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    for _ in range(3):
        train_step(model, ids, opt, build_scheduler(opt, tcfg), 1.0)
    save_model(model, tiny_tokenizer, str(tmp_path))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        resumed = restore_model(cfg, tiny_tokenizer, 3, str(tmp_path)).eval()
        assert is_lora(resumed)
        torch.testing.assert_close(resumed(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_fsdp_runs_on_cpu_but_not_with_lora(tmp_path):
    from aigc_ray.config import ModelConfig
    from aigc_ray.train import TrainError
    from aigc_ray.train.fit import preflight

    assert TrainConfig(strategy="fsdp").strategy == "fsdp"  # CPU/gloo: FSDP2 runs there
    with pytest.raises(TrainError, match="train.strategy=fsdp with model.lora_r"):
        preflight(TrainConfig(strategy="fsdp"), ModelConfig(lora_r=4), str(tmp_path))


def test_elastic_bounds_are_checked():
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match=r"train.min_workers \(3\) must be <= train.num_workers \(2\)"
    ):
        TrainConfig(min_workers=3, num_workers=2)


def test_resume_from_a_position_with_another_world_size():
    """Elastic: 2 workers consume 3 steps, then 3 workers finish the epoch: each position once."""
    first = [p for r in range(2) for p in _positions(r, 2, 0, 24, 4)]
    start, world = 24, 3
    limit = start + (96 - start) // (4 * world) * (4 * world)
    rest = [p for r in range(world) for p in _positions(r, world, start, limit, 4)]
    assert sorted(first + rest) == list(range(limit))


def test_train_result_summary_is_one_screen():
    from aigc_ray.train import TrainResult

    r = TrainResult("m", "r", 10, 2560, 9.0, 6.0, 9.1, 6.5, 12.0, 5_000_000, 1234.0)
    text = r.summary()
    assert len(text.splitlines()) <= 8
    assert "9.100 -> 6.500" in text and "1,234 tokens/s" in text and "r/loss.png" in text


# ---------------------------------------------------------------- each rank's own reader


def _shards(root, n_files=3, rows=50, group=8, seq=4):
    """Parquet shards of rows whose first token is their corpus index; several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    i = 0
    for f in range(n_files):
        ids = [[i + r] + [0] * (seq - 1) for r in range(rows)]
        table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))})
        pq.write_table(table, root / f"part-{f}.parquet", row_group_size=group)
        i += rows
    return n_files * rows


def _order(reader, epoch) -> list[int]:
    return [int(r[0]) for batch in reader(epoch) for r in batch["input_ids"]]


def test_shard_reader_visits_every_row_once_in_a_seeded_order(tmp_path):
    from aigc_ray.train.feed import ShardReader

    n = _shards(tmp_path / "train")
    reader = ShardReader(str(tmp_path / "train"), ["input_ids"], seed=3, window=16)
    first, again = (
        _order(reader, 0),
        _order(ShardReader(str(tmp_path / "train"), ["input_ids"], 3, 16), 0),
    )
    assert sorted(first) == list(range(n)) and first == again  # every rank derives the same
    assert first != list(range(n)), "not shuffled"
    assert _order(reader, 1) != first, "every epoch the same order"
    plain = ShardReader(str(tmp_path / "train"), ["input_ids"], seed=3, window=0)
    assert _order(plain, 0) == list(range(n))  # window 0: corpus order


def test_exactly_once_across_a_world_size_change_with_the_reader(tmp_path):
    from aigc_ray.train.feed import ShardReader

    n = _shards(tmp_path / "train")
    reader = ShardReader(str(tmp_path / "train"), ["input_ids"], seed=0, window=32)
    order = _order(reader, 0)
    seen = []
    for world, start, limit in ((2, 0, 64), (3, 64, 64 + 3 * 4 * 6)):  # 2 ranks, then 3
        for rank in range(world):
            for pos, ids, _ in rank_micro_batches(reader(0, start), rank, world, start, limit, 4):
                assert [order[p] for p in pos.tolist()] == ids[:, 0].tolist()
                seen += pos.tolist()
    assert sorted(seen) == list(range(64 + 72)) and n >= 136


def test_a_resume_reads_no_window_wholly_before_its_start(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from aigc_ray.train.feed import ShardReader

    _shards(tmp_path / "train")
    reader = ShardReader(str(tmp_path / "train"), ["input_ids"], seed=1, window=16)
    full = _order(reader, 0)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda f, g, **kw: reads.append(g) or real(f, g, **kw)
    )
    start = 100
    batches = list(reader(0, start))
    skipped = sum(b["skipped"] for b in batches if "skipped" in b)
    assert 0 < skipped <= start, "windows before the start were read"
    resumed = [int(r[0]) for b in batches if "input_ids" in b for r in b["input_ids"]]
    assert resumed == full[skipped:], "skipping changed the order of what follows"
    assert len(reads) < len(reader.units)


def test_prefetch_keeps_order_and_raises_the_producers_error():
    from aigc_ray.train.feed import prefetch

    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for x in prefetch(broken(), depth=2):
            got.append(x)
    assert got == [1]
    early = prefetch(iter(range(10**6)), depth=2)
    assert next(early) == 0
    early.close()  # the producer thread stops instead of filling a queue nobody reads
