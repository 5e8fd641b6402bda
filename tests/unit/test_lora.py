"""Unit tests for LoRA fine-tuning (aigc_ray.model.apply_lora / merge_lora), no Ray."""

import pytest
import torch

pytest.importorskip("peft")  # optional extra `aigc_ray[lora]`; installed with the test extra

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from aigc_ray.config import TrainConfig  # noqa: E402
from aigc_ray.model import (  # noqa: E402
    LLAMA_LORA_TARGETS,
    apply_lora,
    count_params,
    is_lora,
    merge_lora,
    trainable_parameters,
)
from aigc_ray.train import build_optimizer, build_scheduler, train_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

R = 4


@pytest.fixture
def batch(tiny_tokenizer) -> torch.Tensor:
    """A fixed batch of token ids (2 x 16) to overfit."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(2, len(tiny_tokenizer), (2, 16), generator=gen)


@pytest.fixture
def lora_model(tiny_model):
    return apply_lora(tiny_model, r=R, alpha=8, dropout=0.0, target_modules=None)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(model, ids: torch.Tensor, steps: int = 12) -> list[float]:
    cfg = TrainConfig(lr=2e-2, warmup_steps=0, max_steps=steps, weight_decay=0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    return [train_step(model, ids, opt, sched, grad_clip=1.0)[0] for _ in range(steps)]


def _is_lora_param(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def _has_peft_modules(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft") for m in model.modules())


def _expected_adapter_params(model: torch.nn.Module, targets, r: int) -> int:
    """r * (in + out) for every nn.Linear whose name ends in a target."""
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def test_apply_lora_freezes_base_and_adds_small_adapters(tiny_model, batch):
    base_logits = _logits(tiny_model, batch)
    total = count_params(tiny_model)
    expected = _expected_adapter_params(tiny_model, LLAMA_LORA_TARGETS, R)
    assert not is_lora(tiny_model)

    model = apply_lora(tiny_model, r=R, alpha=8, dropout=0.0, target_modules=None)

    assert is_lora(model)
    assert trainable_parameters(model) == expected
    assert trainable_parameters(model) < 0.2 * total
    for name, p in model.named_parameters():
        assert p.requires_grad == _is_lora_param(name), name
    # every default target was wrapped, embeddings were not
    wrapped = {
        n.split(".lora_A.")[0].rsplit(".", 1)[-1]
        for n, _ in model.named_parameters()
        if ".lora_A." in n
    }
    assert wrapped == set(LLAMA_LORA_TARGETS)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    # LoRA B starts at zero: the wrapped model computes exactly what the base did
    torch.testing.assert_close(_logits(model, batch), base_logits, atol=0, rtol=0)


def test_apply_lora_custom_targets_and_bad_input(tiny_model):
    expected = _expected_adapter_params(tiny_model, ["q_proj", "v_proj"], 2)
    model = apply_lora(tiny_model, r=2, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"])
    assert trainable_parameters(model) == expected
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=None)


@pytest.mark.parametrize("r, alpha, dropout", [(0, 8, 0.0), (4, 0, 0.0), (4, 8, 1.0), (4, 8, -0.1)])
def test_apply_lora_rejects_bad_settings(tiny_model, r, alpha, dropout):
    with pytest.raises(ValueError, match="bad LoRA settings"):
        apply_lora(tiny_model, r=r, alpha=alpha, dropout=dropout, target_modules=None)
    assert not is_lora(tiny_model)


def test_lora_training_lowers_loss_and_keeps_base_frozen(lora_model, batch):
    frozen = {
        n: p.detach().clone() for n, p in lora_model.named_parameters() if not p.requires_grad
    }
    before = _logits(lora_model, batch)

    losses = _train(lora_model, batch)

    # frozen random embeddings limit a 32-wide model; 12 steps reliably take off ~0.35 nats
    assert losses[-1] < losses[0] - 0.2, losses
    assert not torch.allclose(_logits(lora_model, batch), before)
    for name, p in lora_model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen weight {name} changed"


def test_build_optimizer_holds_only_trainable_lora_params(lora_model):
    opt = build_optimizer(lora_model, TrainConfig())
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    trainable = {id(p) for n, p in lora_model.named_parameters() if _is_lora_param(n)}
    assert in_opt == trainable
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trainable_parameters(
        lora_model
    )


def test_merge_lora_gives_plain_model_with_same_logits(lora_model, batch):
    _train(lora_model, batch, steps=4)  # B != 0, so the merge is not trivially a no-op
    lora_logits = _logits(lora_model, batch)
    # Ray Train wraps models in DDP; DataParallel on CPU stands in for it here
    assert is_lora(torch.nn.DataParallel(lora_model))

    merged = merge_lora(lora_model)

    assert type(merged) is LlamaForCausalLM
    assert not is_lora(merged) and not _has_peft_modules(merged)
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged, batch), lora_logits, atol=1e-5, rtol=0)


def test_merge_lora_without_adapters_returns_model(tiny_model):
    assert merge_lora(tiny_model) is tiny_model


def test_merged_model_saves_and_loads_with_plain_transformers(lora_model, batch, tmp_path):
    _train(lora_model, batch, steps=4)
    merged = merge_lora(lora_model)
    expected = _logits(merged, batch)

    merged.save_pretrained(str(tmp_path), safe_serialization=True)

    assert not (tmp_path / "adapter_config.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())  # noqa: SIM118
    loaded, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, output_loading_info=True
    )
    assert type(loaded) is LlamaForCausalLM and not _has_peft_modules(loaded)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=0)
