"""Multi-LoRA ops for vLLM's CPU build that compute per adapter, not per token (a vLLM plugin).

vLLM's CPU build applies LoRA with the PyTorch ops in ``vllm.lora.ops.torch_ops``: for every
LoRA'd layer, ``weights[token_lora_indices]`` copies one adapter matrix *per token* before an
einsum. At 32 streams of 4 adapters that copy is most of a decode step, and in a prefill step of
1,000 tokens it is 1,000 matrices per layer: vLLM's own server served a 4-adapter mix at 0.43x
its base model's tok/s (bench_adapters, round 14). Here each op groups the tokens by adapter
and runs one matmul per adapter present (at most ``max_loras`` + 1), with the same results (the
same sums, up to float rounding) and the same write-back rules (``limit``, ``common_len``,
slices, ``add_inputs``) as vLLM's.

Loaded by vLLM in each of its processes through the ``vllm.general_plugins`` entry point
(pyproject.toml), and active only where ``AIGC_RAY_VLLM_LORA_OPS=1``: VllmEngine sets it before
vLLM starts (vLLM's processes inherit it), so another vLLM in the same environment, such as
vLLM's own server in bench_adapters, keeps its stock ops. Never imports Ray.
"""

from __future__ import annotations

import logging
import os

import torch

# under vLLM's logger: its handler prints INFO in vLLM's processes (tests read the line)
logger = logging.getLogger("vllm.aigc_ray.lora_ops")
ACTIVE = "aigc_ray: vLLM's CPU multi-LoRA ops compute per adapter"

ENV = "AIGC_RAY_VLLM_LORA_OPS"


class _Groups:
    """The rows of each adapter in the last index tensor seen. Every LoRA'd layer of one model
    step gets the same indices (dozens of calls), so they are grouped once per step; a cached
    grouping serves only indices equal to its own."""

    def __init__(self):
        self.last: tuple[torch.Tensor, list[tuple[int, torch.Tensor]]] | None = None

    def of(self, idx: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        last = self.last
        if last is None or last[0].shape != idx.shape or not torch.equal(last[0], idx):
            groups = [(u, (idx == u).nonzero().squeeze(1)) for u in torch.unique(idx).tolist()]
            last = self.last = (idx.clone(), groups)
        return last[1]


_groups = _Groups()


def per_adapter(inputs: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, dtype):
    """Row t of the result: ``inputs[t] @ weights[idx[t]].T`` ([T, i] x [L, (1,) o, i] ->
    [T, o]), what vLLM's einsum over per-token copies gives, with one matmul per adapter.
    (Measured against sorting the tokens by adapter and multiplying contiguous slices: that was
    12% faster for 32 decode tokens and 60% slower for a 1,024-token prefill.)"""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    if idx.shape[0] not in (1, x.shape[0]):  # (one index: every row that adapter)
        raise ValueError(f"{x.shape[0]} input rows but {idx.shape[0]} LoRA indices")
    if idx.numel() == 0:
        return x.new_zeros(0, weights.shape[1])
    groups = _groups.of(idx)
    if len(groups) == 1:  # one adapter in the whole batch
        return x @ weights[groups[0][0]].to(dtype).t()
    out = x.new_empty(x.shape[0], weights.shape[1])
    for u, rows in groups:
        out.index_copy_(0, rows, x.index_select(0, rows) @ weights[u].to(dtype).t())
    return out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to output
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset,
    slice_size,
    add_inputs=True,
):
    outputs = per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


OPS = {
    "bgmv_expand": bgmv_expand,
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand_slice": bgmv_expand_slice,
}


VLLM_OPS: dict = {}  # vLLM's own ops, as register() found them


def register() -> None:
    """vLLM general plugin: swap the bgmv ops where vLLM's CPU LoRA looks them up (the torch_ops
    module, whose sgmv ops call them, and the CPU punica wrapper, which imported them). A no-op
    unless ``AIGC_RAY_VLLM_LORA_OPS=1``; idempotent (vLLM loads plugins once per process)."""
    if os.environ.get(ENV) != "1":
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        VLLM_OPS.setdefault(name, getattr(lora_ops, name))
    for module in (torch_ops, lora_ops, punica_cpu):
        for name, fn in OPS.items():
            setattr(module, name, fn)
    logger.info(ACTIVE)
