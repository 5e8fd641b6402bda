"""Linear-layer kernels of the slot decoder: y = x @ W.T (+ b) in several storage formats.

- ``DenseLinear``: ``F.linear`` in the weight's dtype (GPU, or CPUs without oneDNN).
- ``PackedLinear``: oneDNN with the weight re-laid out once at load (CPU, fp32/bf16). For the
  small row counts of decoding, packing the weight on every call is most of the work: measured
  on the dev machine, 40 cold [32x512]x[512x1536] matmuls took 21.3 ms plain fp32, 6.3 ms
  packed fp32, 3.8 ms packed bf16.
- ``Int8Linear``: int8 weights with a per-output-channel scale. ``mode="w8a8"`` also quantizes
  activations on the fly and multiplies in int8 (oneDNN, VNNI on CPU); ``mode="weight_only"``
  dequantizes in the kernel (``torch._weight_int8pack_mm``, bf16 activations: 8.1 ms in the
  measurement above).
- ``Int4Linear``: int4 weights in groups with scales and zero points
  (``torch._weight_int4pack_mm_for_cpu``), where torch has that kernel.

Quantized weights come from an optimized model directory (aigc_ray.optimize writes them in the
compressed-tensors format that vLLM and transformers also read). Pure torch: never imports Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear:
    """oneDNN linear with the weight packed once (CPU; fp32 or bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        weight = weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def fuse_weights(*mods, dtype=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of several nn.Linear layers sharing an input (q/k/v, gate/up) as one
    layer: weights stacked along the output; a missing bias is zeros beside a present one."""
    weight = torch.cat([m.weight.detach().to(dtype or m.weight.dtype) for m in mods])
    if all(m.bias is None for m in mods):
        return weight, None
    bias = torch.cat(
        [
            m.bias.detach()
            if m.bias is not None
            else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype)
            for m in mods
        ]
    )
    return weight, bias


def fused_dense(*mods):
    """One dense kernel (the fastest, see ``dense``) for several layers sharing an input."""
    return dense(*fuse_weights(*mods))


def fused_unpacked(*mods):
    """One plain ``F.linear`` for several layers sharing an input (what inductor can lower)."""
    return DenseLinear(*fuse_weights(*mods))


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The fastest dense kernel for this weight's device and dtype."""
    if (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and onednn_available()
    ):
        return PackedLinear(weight, bias)
    return DenseLinear(weight, bias)


class Int8Linear:
    """int8 weights with per-output-channel scales.

    ``w8a8``: activations are quantized on the fly too (per tensor, asymmetric uint8, as torch's
    dynamic quantization does) and multiplied in int8 by oneDNN with the weight packed once
    (``onednn.qlinear_pointwise``; VNNI on CPU). Measured on the dev machine for 40
    [32x512]x[512x1536] matmuls: 5.5 ms, against 7.1 ms packed fp32. ``weight_only``: the
    weight is dequantized inside the kernel (``torch._weight_int8pack_mm``, bf16 activations).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias=None,
        mode="w8a8",
        dtype=torch.float32,
    ):
        if mode not in ("w8a8", "weight_only"):
            raise ValueError(f"int8 mode must be w8a8 or weight_only, got {mode!r}")
        self.mode, self.dtype = mode, dtype
        self.scale = scale.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        if mode == "w8a8":
            self.packed = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)
            self.zero_points = torch.zeros(qweight.shape[0], dtype=torch.int64)
        else:
            self.qweight = qweight.contiguous()
            self.scale_act = self.scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == "w8a8":
            out = self._w8a8(x2)
        else:
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale_act)
            out = out.to(self.dtype) if self.bias is None else out.float() + self.bias
        return out.to(self.dtype).reshape(*shape[:-1], out.shape[-1])

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x.float())
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        x_scale = max(hi - lo, 1e-8) / 255
        zero = int(round(-lo / x_scale))
        xq = torch.clamp(torch.round(x.float() / x_scale) + zero, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            xq,
            x_scale,
            zero,
            self.packed,
            self.scale,
            self.zero_points,
            self.bias,
            1.0,
            0,
            self.dtype,
            "none",
            [],
            "",
        )


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear:
    """int4 weight-only (groups of ``group_size`` along the input dim), bf16 activations."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        bias=None,
        dtype=torch.float32,
    ):
        if not int4_kernel_available():
            raise RuntimeError("this torch build has no CPU int4 matmul kernel")
        self.group_size, self.dtype = group_size, dtype
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # torch's layout: scales_and_zeros [groups, out, 2] with w = (q - 8) * s + z', where
        # z' absorbs our zero point: w = (q - zero) * s = (q - 8) * s + (8 - zero) * s.
        s = scale.t().contiguous()
        z = ((8 - zero) * scale).t().contiguous()
        self.scales_and_zeros = torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros
        ).to(self.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], out.shape[-1])


# ---------------------------------------------------------------- compressed-tensors model dirs


def quantization_scheme(config: dict) -> dict | None:
    """The one weight scheme of a compressed-tensors ``quantization_config``, as
    {"kind": "w8a8" | "int8_weight_only" | "int4_weight_only", "group_size", "ignore"}; None
    when the directory is not quantized. Other schemes raise ValueError naming them."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(
            f"quantization method {qc.get('quant_method')!r} is not compressed-tensors"
        )
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"expected one quantization group, found {len(groups)}")
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if bits == 8 and strategy == "channel" and w.get("symmetric", True):
        kind = "w8a8" if a and a.get("num_bits") == 8 and a.get("dynamic") else "int8_weight_only"
    elif bits == 4 and strategy == "group" and w.get("symmetric", True):
        kind = "int4_weight_only"
    else:
        raise ValueError(f"unsupported weight scheme: {bits}-bit {strategy}")
    return {"kind": kind, "group_size": w.get("group_size"), "ignore": qc.get("ignore") or []}


def read_weight_scales(model_dir: str) -> dict[str, torch.Tensor]:
    """{module name: weight_scale} from the directory's safetensors files."""
    from pathlib import Path

    from safetensors import safe_open

    scales = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith(".weight_scale"):
                    scales[key.removesuffix(".weight_scale")] = f.get_tensor(key)
    return scales


def compressed_linear_factory(model, model_dir: str, scheme: dict):
    """The slot decoder's ``linear`` for a quantized directory loaded dequantized (transformers
    decompresses compressed-tensors): the int8/int4 values are recovered exactly from the
    dequantized weights and the stored scales, and run on the int kernels above."""
    scales = read_weight_scales(model_dir)
    names = {id(m): n for n, m in model.named_modules()}
    dtype = next(model.parameters()).dtype

    def linear(*mods):
        keys = [names.get(id(m)) for m in mods]
        if any(k not in scales for k in keys):
            return fused_dense(*mods)  # not quantized (e.g. lm_head)
        weight, bias = fuse_weights(*mods, dtype=torch.float32)
        scale = torch.cat([scales[k].float() for k in keys])  # [out, 1] or [out, groups]
        if scheme["kind"] == "int4_weight_only":
            group = scheme["group_size"]
            q = torch.round(weight.reshape(weight.shape[0], -1, group) / scale[..., None])
            q = (q.clamp(-8, 7) + 8).reshape(weight.shape).to(torch.int32)
            zero = torch.full_like(scale, 8.0)
            return Int4Linear(q, scale, zero, group, bias, dtype)
        q = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
        mode = "w8a8" if scheme["kind"] == "w8a8" else "weight_only"
        return Int8Linear(q, scale.flatten(), bias, mode, dtype)

    return linear
