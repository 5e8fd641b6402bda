"""LoRA adapters on the built-in engine: many adapters over one base model, rows of different
adapters (and of none) decoding in the same batch. Nothing is merged: each adapted projection
adds ``(x @ A^T) @ B^T * scale`` to the rows of that adapter, one small matmul pair per adapter
present in the step. Adapters are PEFT's directories (``adapter_config.json`` +
``adapter_model.safetensors``), as ``train.lora`` exports them and vLLM's ``--enable-lora``
loads them. No Ray here."""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from aigc_ray.engine.params import EngineError, InvalidParamError

# PEFT module name -> (the slot decoder's fused projection, which part of its output)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(InvalidParamError):
    """An adapter this engine cannot use: not configured, unreadable, trained for another base
    model, or of a rank above the configured maximum. The request naming it fails (its
    ``status``: 404 for an unknown name, else 400); the engine keeps serving the others."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message, "model")
        self.status = status


class AdaptersBusyError(EngineError):
    """Every adapter slot holds an adapter that running requests still use (retry once some
    finish; serving answers 503)."""


@dataclass
class Adapter:
    """One loaded adapter: its rank, scale and, per (layer, module), (A [r, in], B [out, r])."""

    name: str
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable projection of a Llama-family ``config``."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = config.intermediate_size
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def read_adapter(
    name: str, path: str, config, max_rank: int, dtype: torch.dtype, device
) -> Adapter:
    """Load PEFT adapter directory ``path`` for a model of ``config``; AdapterError with the
    reason when it is missing, unreadable, of another base or of a rank above ``max_rank``."""
    from aigc_ray.storage import is_uri, local_model_dir

    try:
        local = Path(local_model_dir(path) if is_uri(path) else path)
    except Exception as e:  # noqa: BLE001 - any storage failure is this adapter's
        raise AdapterError(f"adapter {name!r}: cannot read {path}: {e}") from None
    cfg_file, weights_file = local / "adapter_config.json", local / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise AdapterError(
            f"adapter {name!r}: {path} is not a PEFT adapter directory "
            "(adapter_config.json and adapter_model.safetensors)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha") or cfg["r"])
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"adapter {name!r}: bad adapter_config.json in {path}: {e}") from None
    if rank > max_rank:
        raise AdapterError(
            f"adapter {name!r}: rank {rank} exceeds the configured max_lora_rank {max_rank}"
        )
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(weights_file))
    except Exception as e:  # noqa: BLE001 - a corrupt file is this adapter's problem
        raise AdapterError(f"adapter {name!r}: cannot read {weights_file}: {e}") from None
    shapes, layers = module_shapes(config), config.num_hidden_layers
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in shapes:
            raise AdapterError(f"adapter {name!r}: unsupported tensor {key} (LoRA on linears only)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        n_in, n_out = shapes[module]
        want = (rank, n_in) if which == "A" else (n_out, rank)
        if layer >= layers or tuple(tensor.shape) != want:
            raise AdapterError(
                f"adapter {name!r} was trained for another base model: {key} has shape "
                f"{tuple(tensor.shape)}, this model ({layers} layers) needs {want}"
            )
        parts.setdefault((layer, module), {})[which] = tensor.to(device=device, dtype=dtype)
    weights = {}
    for where, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {where[0]} {where[1]} lacks lora_A or B")
        weights[where] = (ab["A"], ab["B"])
    if not weights:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA weights")
    return Adapter(name, rank, scale, weights)


class AdapterBank:
    """The adapters one engine serves: ``paths`` (name -> directory) are loaded on first use
    into one of ``max_loras`` slots; beyond that the least recently used adapter that no
    request holds is evicted. Slot 0 is the base model (no adapter). ``acquire`` and
    ``release`` count the requests holding each slot; thread-safe."""

    def __init__(self, paths: dict[str, str], config, max_loras: int, max_rank: int, dtype, device):
        self.paths, self.config = dict(paths), config
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.slots: list[Adapter | None] = [None] * (max_loras + 1)
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self._refs = [0] * (max_loras + 1)
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from disk (first uses and reloads after eviction)
        self.version = 0  # moves whenever a slot's adapter changes (decoders rebuild stacks)

    def acquire(self, name: str | None) -> int:
        """The slot of adapter ``name`` (loaded now if needed), held until ``release``."""
        if name is None:
            return 0
        if name not in self.paths:
            raise AdapterError(
                f"adapter {name!r} not found; available: {sorted(self.paths)}", status=404
            )
        with self._lock:
            slot = self._loaded.get(name)
            if slot is None:
                slot = self._free_slot(name)
                self.slots[slot] = read_adapter(
                    name, self.paths[name], self.config, self.max_rank, self.dtype, self.device
                )
                self.version += 1
                self.loads += 1
                self._loaded[name] = slot
            self._loaded.move_to_end(name)
            self._refs[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        if slot:
            with self._lock:
                self._refs[slot] -= 1

    def _free_slot(self, name: str) -> int:
        for slot in range(1, self.max_loras + 1):
            if self.slots[slot] is None:
                return slot
        for victim, slot in self._loaded.items():  # least recently used first
            if self._refs[slot] == 0:
                del self._loaded[victim]
                self.slots[slot] = None
                return slot
        raise AdaptersBusyError(
            f"adapter {name!r}: all {self.max_loras} adapter slots are held by running "
            "requests of other adapters; retry shortly"
        )

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


def row_slots(adapters: list[int], device) -> torch.Tensor | None:
    """The adapter slot of each row as a tensor; None when no row has an adapter."""
    if not any(adapters):
        return None
    return torch.tensor(adapters, device=device)


@dataclass
class Stack:
    """Every loaded adapter's LoRA of one fused projection of one layer, stacked: rows of
    ``a`` [R, in] are the adapters' A matrices, part by part of the fused output (e.g. q, k,
    v), ``slot`` [R] the adapter slot of each row; ``blocks`` [(lo, hi, b, start)]: rows lo:hi
    of ``a`` belong to the part at output columns start:start + b.shape[1], whose B^T * scale
    they stack in ``b`` [hi - lo, size]. A batch's deltas are then ((x A^T) * mask) then one
    matmul per part, mask[row, j] = (slot of row == slot[j]): a fixed number of small matmuls
    per projection whatever the number of adapters in the batch (bench_adapters, 32 streams
    of 4 adapters: 0.84x the base model's tok/s; a matmul pair per adapter gave 0.32x)."""

    a: torch.Tensor
    slot: torch.Tensor
    blocks: list[tuple[int, int, torch.Tensor, int]]

    def mask(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        """[n, R] 1.0 where row i's adapter owns column j of x A^T (rows: slots [n])."""
        return (rows.unsqueeze(1) == self.slot).to(dtype)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``out`` += the LoRA delta of ``x`` [n, ..., in] (``mask`` from ``mask``), in place."""
        xa = x @ self.a.t()
        xa = xa * (mask if x.dim() == 2 else mask.view(mask.shape[0], 1, -1))
        for lo, hi, b, start in self.blocks:
            out[..., start : start + b.shape[1]] += xa[..., lo:hi] @ b
        return out


def stack(
    slots: list[Adapter | None], layer: int, parts: list[tuple[str, int, int]]
) -> Stack | None:
    """The Stack of one fused projection (``parts``: (PEFT module, start, size) of its output
    columns) of ``layer`` over the adapters in ``slots``; None when none adapts it."""
    a_rows, owner, blocks = [], [], []
    for module, start, _ in parts:
        lo, bs = len(owner), []
        for slot, adapter in enumerate(slots):
            w = None if adapter is None else adapter.weights.get((layer, module))
            if w is not None:
                a_rows.append(w[0])
                bs.append(w[1].t() * adapter.scale)
                owner += [slot] * w[0].shape[0]
        if bs:
            blocks.append((lo, len(owner), torch.cat(bs).contiguous(), start))
    if not a_rows:
        return None
    device = a_rows[0].device
    return Stack(torch.cat(a_rows), torch.tensor(owner, device=device), blocks)
