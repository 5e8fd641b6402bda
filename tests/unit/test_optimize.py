"""The optimize stage without Ray: pruning, quantized directories the engine serves on its int
kernels, the report, the quality gate, and clear errors before any work."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny import stdlib_sample

from aigc_ray.config import OptimizeConfig
from aigc_ray.optimize import (
    OptimizeError,
    prune_2of4,
    prune_magnitude,
    prune_mlp_channels,
    run_optimize,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer):
    """A data-stage-shaped directory: manifest.json and one val shard of 32-token blocks."""
    root = tmp_path_factory.mktemp("opt-data")
    ids = tiny_tokenizer("\n".join(stdlib_sample(20_000)))["input_ids"]
    blocks = [ids[i : i + 32] for i in range(0, len(ids) - 32, 32)][:24]
    shard = root / "val-0.parquet"
    pq.write_table(pa.table({"input_ids": blocks}), shard)
    manifest = {"splits": {"val": {"shards": [str(shard)]}, "train": {"shards": []}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, tiny_model_cfg, tiny_tokenizer, data_dir):
    """The tiny model fitted to the val blocks (a random model's perplexity is near uniform:
    damage cannot show on it)."""
    from aigc_ray.model import build_model
    from aigc_ray.optimize import val_blocks

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    blocks = val_blocks(data_dir, 24)
    adam = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = model(input_ids=blocks, labels=blocks).loss
        loss.backward()
        adam.step()
        adam.zero_grad()
    out = tmp_path_factory.mktemp("trained")
    model.save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return str(out)


def opt(tmp_path, **kw) -> OptimizeConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "benchmark": False,
        "eval_blocks": 16,
        "held_prompts": 4,
        "agreement_tokens": 8,
    }
    return OptimizeConfig(**{**base, **kw})


def test_magnitude_and_2of4_pruning(tiny_model):
    masks = prune_magnitude(tiny_model, 0.5)
    for name, m in tiny_model.named_modules():
        if name in masks:
            assert abs(float((m.weight == 0).float().mean()) - 0.5) < 0.02, name
    embed = tiny_model.model.embed_tokens.weight
    assert float((embed == 0).float().mean()) < 0.01  # embeddings are not pruned (pad row is 0)
    prune_2of4(tiny_model)
    w = tiny_model.model.layers[0].mlp.up_proj.weight
    assert int((w.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2


def test_mlp_channel_pruning_gives_a_smaller_model_that_still_runs(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    width = tiny_model.config.intermediate_size
    prune_mlp_channels(tiny_model, 0.5)
    assert tiny_model.config.intermediate_size == width // 2
    assert tiny_model.model.layers[0].mlp.down_proj.weight.shape[1] == width // 2
    tiny_model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    logits = again(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == tiny_model.config.vocab_size and torch.isfinite(logits).all()


DEFAULT_GATE = OptimizeConfig().max_perplexity_increase  # +5%


# Perplexity rise measured on the trained model: w8a8 +0.34%, int8 weight-only +0.08%, int4
# +5.0% (round-to-nearest of a 32-wide model plus bf16 for the rest; +5.9% with plain min/max
# ranges): int4 is just over the default gate, so it runs at +8%. The int8 budget (1%) is what
# catches a coarse int8 grid: scales x16 (16 levels) still pass the +5% gate at +4.9%.
@pytest.mark.parametrize(
    ("method", "gate", "budget"),
    [
        ("w8a8", DEFAULT_GATE, 0.01),
        ("int8_weight_only", DEFAULT_GATE, 0.01),
        ("int4_weight_only", 0.08, 0.08),
    ],
)
def test_quantized_trained_model_passes_the_gate_and_runs_on_int_kernels(
    tmp_path, trained_model_dir, data_dir, method, gate, budget, measured
):
    """The trained model (on a random-init one, whose outputs are near uniform, a broken
    quantizer passes as well as a good one) quantized with the quality gate on: perplexity
    within the gate (int8: the default +5%) and the method's budget, greedy outputs kept
    (>= 0.8; measured 1.0 for all three); the directory is served on int kernels."""
    from aigc_ray.engine import GenerationEngine, SamplingParams
    from aigc_ray.engine.quant import Int4Linear, Int8Linear

    cfg = opt(tmp_path, quantization=method, max_perplexity_increase=gate)
    report = run_optimize(cfg, trained_model_dir, data_dir)
    measured(
        f"{method} of the trained tiny model",
        f"perplexity {report['perplexity_increase']:+.2%}, "
        f"greedy agreement {report['greedy_agreement']:.3f}",
    )
    out = Path(report["output_dir"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert json.loads((out / "report.json").read_text())["steps"] == report["steps"]
    assert report["size_ratio"] < 0.6 and report["passed"]
    # trained: damage shows (a random model's perplexity is near its vocabulary size, 400)
    assert report["original"]["perplexity"] < 10
    assert report["perplexity_increase"] <= min(gate, budget), report
    assert report["greedy_agreement"] >= 0.8, report
    engine = GenerationEngine.from_pretrained(str(out), device="cpu")
    try:
        kind = Int4Linear if "int4" in method else Int8Linear
        assert isinstance(engine.runner.decoder.layers[0].qkv, kind)
        assert engine.generate(["def f():"], SamplingParams(max_tokens=4, temperature=0))
    finally:
        engine.close()
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left behind


def test_perplexity_gate_rejects_a_damaged_model(tmp_path, trained_model_dir, data_dir):
    cfg = opt(tmp_path, pruning="magnitude", sparsity=0.95, max_perplexity_increase=0.05)
    with pytest.raises(OptimizeError) as e:
        run_optimize(cfg, trained_model_dir, data_dir)
    assert "rejected" in str(e.value) and e.value.report["passed"] is False
    assert e.value.report["perplexity_increase"] > 0.01
    assert "magnitude pruning 95%" in e.value.report["steps"]
    mild = run_optimize(
        opt(tmp_path, pruning="magnitude", sparsity=0.1, max_perplexity_increase=0.05),
        trained_model_dir,
        data_dir,
    )
    assert mild["passed"] and mild["perplexity_increase"] < 0.05  # a light touch passes
    assert mild["greedy_agreement"] > 0.5


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"quantization": "int4_weight_only", "int4_group_size": 128}, "no group size"),
        ({"quantization": "int4_weight_only", "dtype": "float32"}, "needs dtype bfloat16"),
        ({}, "nothing to do"),
        ({"pruning": "none", "recovery_steps": 10, "dtype": "bfloat16"}, "needs a pruning"),
    ],
)
def test_impossible_requests_fail_before_any_work(tmp_path, tiny_model_dir, kw, message):
    with pytest.raises(OptimizeError, match=message):
        run_optimize(opt(tmp_path, **kw), str(tiny_model_dir), None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_bf16_without_cpu_support_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    import aigc_ray.optimize as optimize

    monkeypatch.setattr(optimize, "_bf16_supported", lambda: False)
    with pytest.raises(OptimizeError, match="bf16 support"):
        run_optimize(opt(tmp_path, dtype="bfloat16"), str(tiny_model_dir), None)
    assert not (tmp_path / "out").exists()


def test_models_without_linear_layers_cannot_be_quantized(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))
    )
    src = tmp_path / "gpt2"
    model.save_pretrained(str(src))
    tiny_tokenizer.save_pretrained(str(src))
    with pytest.raises(OptimizeError, match="no nn.Linear"):
        run_optimize(opt(tmp_path, quantization="w8a8"), str(src), None)


def test_a_failure_midway_leaves_nothing_half_written(tmp_path, tiny_model_dir, monkeypatch):
    import aigc_ray.optimize as optimize

    def boom(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(optimize, "quantize_and_save", boom)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("an earlier result")
    with pytest.raises(RuntimeError, match="simulated"):
        run_optimize(opt(tmp_path, quantization="w8a8"), str(tiny_model_dir), None)
    assert (tmp_path / "out" / "previous.txt").exists()  # the earlier result is untouched
    assert not list(tmp_path.glob(".out.*"))
