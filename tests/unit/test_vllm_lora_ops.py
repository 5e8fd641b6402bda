"""aigc_ray.engine.vllm_lora_ops against vLLM's own CPU LoRA ops: the same outputs for the same
inputs (every write-back rule), and the plugin swaps them only where aigc_ray asks. In real
vLLM (the adapter row's greedy text equals the merged model's, and vLLM's processes log that
these ops run): tests/integration/test_batch_generation.py."""

import pytest
import torch

from aigc_ray.engine import vllm_lora_ops as ours

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

T, IN, OUT, L = 37, 64, 48, 5


def vllm_op(name: str):
    """vLLM's own op (register() may have replaced it in this process: vLLM loads plugins in
    the process that builds its engine args)."""
    fn = ours.VLLM_OPS.get(name) or getattr(lora_ops, name)
    assert fn.__module__ == lora_ops.__name__, fn
    return fn


def _case(seed: int, mixed: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, IN, generator=g)
    w = torch.randn(L, 1, OUT, IN, generator=g)  # vLLM's stacked [L, 1, out, in]
    idx = (
        torch.randint(-1, L - 1, (T,), generator=g)  # -1: no adapter (vLLM's last slot)
        if mixed
        else torch.full((T,), 2, dtype=torch.long)
    )
    return x, w, idx


@pytest.mark.parametrize("dtypes", ["fp32", "bf16 in, fp32 out", "fp32 in, bf16 out"])
@pytest.mark.parametrize("mixed", [True, False], ids=["4-adapter mix", "one adapter"])
@pytest.mark.parametrize("add", [True, False])
def test_expand_and_shrink_equal_vllms(mixed, add, dtypes):
    x, w, idx = _case(1, mixed)
    out_dtype = torch.bfloat16 if dtypes.endswith("bf16 out") else torch.float32
    if dtypes.startswith("bf16"):
        x, w = x.bfloat16(), w.bfloat16()
    tol = 1e-5 if dtypes == "fp32" else 2e-2
    for name, extra in [
        ("bgmv_expand", (add,)),
        ("bgmv_shrink", (0.5,)),
        ("bgmv_expand_slice", (8, OUT, add)),
    ]:
        base = torch.randn(T, OUT + 16).to(out_dtype)
        want, got = base.clone(), base.clone()
        vllm_op(name)(x, w, want, idx, *extra)
        getattr(ours, name)(x, w, got, idx, *extra)
        assert got.dtype == want.dtype == out_dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10, msg=name)
        assert not torch.equal(got, base), name  # it wrote something


def test_one_row_of_output_broadcast_as_vllms():
    """vLLM's rule: one output row against a taller output tensor writes that row."""
    x, w, idx = _case(2)
    want, got = torch.zeros(4, OUT), torch.zeros(4, OUT)
    vllm_op("bgmv_expand")(x[:1], w, want, idx[:1], True)
    ours.bgmv_expand(x[:1], w, got, idx[:1], True)
    torch.testing.assert_close(got, want)


def test_sgmv_prefill_ops_reach_ours_once_registered(monkeypatch):
    """vLLM's sgmv ops (prefill) explode the per-sequence indices and call the module's bgmv
    ops; register() swaps those and the CPU punica wrapper's imported names, only under
    AIGC_RAY_VLLM_LORA_OPS=1."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (torch_ops, lora_ops, punica_cpu):
        for name in ours.OPS:
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.delenv(ours.ENV, raising=False)
    ours.register()
    assert punica_cpu.bgmv_expand is not ours.bgmv_expand
    monkeypatch.setenv(ours.ENV, "1")
    ours.register()
    for name, fn in ours.OPS.items():
        assert getattr(punica_cpu, name) is fn and getattr(lora_ops, name) is fn, name
        assert getattr(torch_ops, name) is fn and vllm_op(name) is not fn, name

    called = []
    monkeypatch.setattr(ours, "per_adapter", lambda *a: called.append(1) or torch.zeros(T, OUT))
    x, w, idx = _case(3)
    seq_lens = torch.tensor([T])
    lora_ops.sgmv_expand(x, w, torch.zeros(T, OUT), None, seq_lens, idx[:1], 1, T, T, False)
    assert called


def test_indices_changed_in_place_get_a_new_grouping():
    """vLLM rewrites one index buffer in place between steps; the grouping cached for the last
    step must not serve the next."""
    x, w, idx = _case(4)
    for _ in range(2):
        want = torch.einsum("bi,boi->bo", x, w.squeeze(1)[idx])
        torch.testing.assert_close(ours.per_adapter(x, w, idx, torch.float32), want)
        idx.copy_(torch.roll(idx, 5))
