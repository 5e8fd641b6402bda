"""DP-SGD pieces without Ray (aigc_ray.train.privacy): Opacus' per-sample clipping as the
training step uses it, Poisson sampling, the accountant and its checkpointed state, and the
settings and layers refused before training. (The Ray Train run with a worker killed
mid-run is tests/integration/test_train_faults.py.)"""

import math

import numpy as np
import pytest
import torch

from aigc_ray.config import ConfigError, TrainConfig, load_config
from aigc_ray.train.privacy import (
    SAMPLE_STREAM,
    Ledger,
    PoissonFeed,
    check_model,
    check_settings,
    dp_step,
    make_private,
    plain,
    plan,
)
from aigc_ray.train.steps import TrainError


def _cfg(**privacy) -> TrainConfig:
    return TrainConfig(
        batch_size=4,
        num_workers=1,
        max_steps=50,
        privacy={"enabled": True, "target_epsilon": 8.0, **privacy},
    )


def _row_grads(model, batch, labels) -> list[list[torch.Tensor]]:
    """Each row's own gradient, the slow way: the row alone through the model, the mean loss
    of its own predicted tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(batch)):
        model.zero_grad()
        logits = model(input_ids=batch[i : i + 1]).logits[:, :-1]
        tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[i : i + 1, 1:].reshape(-1),
            ignore_index=-100,
        )
        tok.backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad()
    return out


def _norm(grads) -> float:
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


def _clipped_mean(rows, clip: float, expected: float) -> list[torch.Tensor]:
    """DP-SGD's gradient without noise: each row's gradient clipped to `clip`, summed, over the
    expected batch size."""
    total = [torch.zeros_like(g) for g in rows[0]]
    for grads in rows:
        scale = min(1.0, clip / (_norm(grads) + 1e-6))
        total = [t + g * scale for t, g in zip(total, grads, strict=True)]
    return [t / expected for t in total]


def _step_with_sgd(model, micro, dp):
    """One dp_step with SGD(lr=1) and no noise: the parameters move by exactly -gradient."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    module, dp_opt = make_private(model, opt, dp, world=1)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss_sum, rows, norm = dp_step(module, micro, dp_opt, sched)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    return module, [b - a for b, a in zip(before, after, strict=True)], loss_sum, rows, norm


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_rows_gradient_is_clipped_on_its_own(tiny_model, lora):
    """Per-sample clipping as Opacus applies it inside dp_step (two micro-batches, tied
    embeddings, an SFT row whose prompt tokens are -100, a LoRA model's adapters only) equals
    the row-by-row reference, with some rows clipped and some not; a loss averaged over all
    tokens of the batch (rows weighted by their token counts) or a batch-level clip would
    not."""
    from aigc_ray.model import apply_lora

    torch.manual_seed(0)
    model = apply_lora(tiny_model, r=4) if lora else tiny_model
    if lora:  # B starts at 0: give the adapters a gradient through both factors
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 300, (5, 24))
    labels = ids.clone()
    labels[1, :15] = -100  # an SFT row: only its last tokens count
    rows = _row_grads(model, ids, labels)
    norms = sorted(_norm(g) for g in rows)
    clip = (norms[1] + norms[2]) / 2  # two rows clipped, three kept as they are
    dp = plan(_cfg(noise_multiplier=1e-9, max_grad_norm=clip), rows=100)
    dp.sample_rate = 0.04  # expected 4 rows of 100
    want = _clipped_mean(rows, clip, expected=4.0)
    micro = [(ids[:3], labels[:3]), (ids[3:], labels[3:])]
    module, moved, loss_sum, rows, _ = _step_with_sgd(model, micro, dp)
    assert rows == 5 and math.isfinite(loss_sum)
    assert plain(module) is model
    for got, ref in zip(moved, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-7)
    if lora:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)


def test_noise_is_added_once_with_the_planned_std(tiny_model):
    """A rank that drew no rows still steps (an empty clipped sum): its update is pure noise,
    with std noise_multiplier x max_grad_norm / expected batch size per coordinate."""
    dp = plan(_cfg(noise_multiplier=2.0, max_grad_norm=1.0), rows=100)
    dp.sample_rate = 0.08  # expected 8 rows
    _, moved, _, rows, norm = _step_with_sgd(tiny_model, [], dp)
    assert rows == 0
    flat = torch.cat([m.flatten() for m in moved])
    assert float(flat.std()) == pytest.approx(2.0 * 1.0 / 8, rel=0.05)
    assert float(flat.mean()) == pytest.approx(0.0, abs=0.01)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-4)


def test_the_planned_noise_spends_the_target_epsilon_by_opacus_own_accountant():
    """plan() picks the noise for train.max_steps at q = rows per step / N; Opacus'
    RDP accountant, run here on its own, spends the target within 1% at the last step and
    never more; delta defaults to 1/N."""
    from opacus.accountants import RDPAccountant

    cfg = _cfg()
    dp = plan(cfg, rows=1000)
    assert dp.sample_rate == pytest.approx(4 / 1000)
    assert dp.delta == pytest.approx(1 / 1000)
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, 4 / 1000, cfg.max_steps)]
    eps = acc.get_epsilon(delta=1 / 1000)
    assert eps <= 8.0 and eps == pytest.approx(8.0, rel=0.01)
    # the Ledger the workers step, once per step, reports the same
    ledger = Ledger(dp)
    for _ in range(cfg.max_steps):
        ledger.step()
    assert ledger.epsilon() == pytest.approx(eps, rel=1e-9)


def test_the_accountant_state_survives_a_checkpoint_and_the_budget_stop_is_exact():
    """A Ledger restored from its state_dict at step 20 and stepped to 50 reports what one
    stepped 50 times reports; epsilon_after_next is the next step's epsilon (the loop stops
    before a step whose epsilon_after_next exceeds target_epsilon)."""
    dp = plan(_cfg(noise_multiplier=1.0), rows=200)
    whole, part = Ledger(dp), Ledger(dp)
    for _ in range(20):
        whole.step()
        part.step()
    state = torch.load(_roundtrip(part.state_dict()), weights_only=False)
    resumed = Ledger(dp, state)
    for _ in range(30):
        whole.step()
        resumed.step()
    assert resumed.steps == whole.steps == 50
    assert resumed.epsilon() == whole.epsilon()
    nxt = whole.epsilon_after_next()
    whole.step()
    assert nxt == whole.epsilon()
    assert Ledger(dp).epsilon() == 0.0


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


class _Rows:
    """A ShardReader stand-in: rows whose tokens are their own position, in two windows."""

    def __init__(self, n: int, seq: int = 8):
        self.n, self.seq = n, seq

    def __call__(self, epoch, start=0):
        rows = np.repeat(np.arange(self.n, dtype=np.int32)[:, None], self.seq, axis=1)
        yield {"input_ids": rows[: self.n // 3]}
        yield {"input_ids": rows[self.n // 3 :]}


def test_poisson_feed_draws_each_row_independently_with_probability_q():
    """Every rank draws the same batch (the seeded rule documented in privacy.py, recomputed
    here), takes its positions p % world == rank and looks up the right rows; over 400 steps
    each row is drawn q x 400 times on average and batch sizes vary as Binomial(N, q)."""
    cfg = TrainConfig(batch_size=3, num_workers=2, seed=7)
    n, q, world = 101, 0.1, 2
    feeds = [PoissonFeed(cfg, r, world, n, _Rows(n), q) for r in range(world)]
    assert feeds[0].probe == feeds[1].probe
    counts, sizes = np.zeros(n), []
    for step in range(400):
        rng = np.random.default_rng([7, SAMPLE_STREAM, step])
        want = np.flatnonzero(rng.random(n) < q)
        got = []
        for r, feed in enumerate(feeds):
            pos, micro = feed.step(step)
            assert all(p % world == r for p in pos)
            assert all(len(ids) <= 3 for ids, _ in micro)
            rows = torch.cat([ids for ids, _ in micro]) if micro else torch.zeros(0, 8)
            assert rows[:, 0].tolist() == list(pos)  # the row at each position, not another
            got += list(pos)
        assert sorted(got) == want.tolist()
        counts[want] += 1
        sizes.append(len(want))
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.05)
    assert np.std(sizes) == pytest.approx(math.sqrt(n * q * (1 - q)), rel=0.2)
    assert counts.mean() == pytest.approx(400 * q, rel=0.05) and counts.min() > 10


def test_what_opacus_cannot_run_is_refused_naming_it(tiny_model):
    """A layer that mixes the rows of a batch (BatchNorm) is named with its module path; FSDP
    and fp16 loss scaling are refused by name; enabling privacy without a budget or a noise
    level is a config error."""
    check_model(tiny_model)  # Llama (RMSNorm through torch.func): supported
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(TrainError, match=r"1 \(BatchNorm1d\)"):
        check_model(net)
    with pytest.raises(TrainError, match="strategy=fsdp"):
        check_settings(_cfg().model_copy(update={"strategy": "fsdp"}))
    with pytest.raises(TrainError, match="precision=fp16"):
        check_settings(_cfg().model_copy(update={"use_gpu": True, "precision": "fp16"}))
    with pytest.raises(ConfigError, match="target_epsilon or train.privacy.noise_multiplier"):
        load_config("configs/tiny.yaml", ["train.privacy.enabled=true"])


def test_fit_refuses_before_any_worker_starts(tmp_path, monkeypatch):
    """fit() with train.privacy and FSDP fails in its preflight: no Ray call is made."""
    import ray

    from aigc_ray.train import fit

    def no_ray(*a, **k):
        raise AssertionError("Ray was called before the preflight refused the config")

    monkeypatch.setattr(ray, "available_resources", no_ray)
    cfg = load_config(
        "configs/tiny.yaml",
        ["train.privacy.enabled=true", "train.privacy.target_epsilon=4", "train.strategy=fsdp"],
    )
    with pytest.raises(TrainError, match="strategy=fsdp"):
        fit(cfg.train, cfg.model, str(tmp_path / "no-shards"))
