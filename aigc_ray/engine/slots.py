"""The built-in engine's fast path: a Llama-family decoder over a pre-allocated KV cache.

Each running request owns a slot of the cache (``[slots, kv_heads, max_len, head_dim]`` per
layer) for its whole life: joining writes its prompt's keys and values into a free slot, a
decode step writes one column per row in place, leaving frees the slot. Nothing is ever copied,
concatenated or re-padded. Attention runs over each row's own length (SDPA with a per-row length
mask) on the slots ``[0, hi)``, where ``hi`` is one past the highest slot in use: a freed slot
below it is a hole that computes a dummy row until a joiner takes it (the lowest free slot
first), which costs less than moving another row's cache into it.

Weights come from the Hugging Face model (Llama, Mistral without a sliding window, Qwen2,
Qwen3): q/k/v and gate/up are fused into one matmul each, so a layer runs four matmuls. Linear
layers are kernels from quant.py: dense in the model's dtype (oneDNN-packed on CPU) or int8 /
int4 for optimized model directories. Pure torch: never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aigc_ray.engine.lora import row_slots, stack
from aigc_ray.engine.quant import fused_dense, fused_unpacked
from aigc_ray.engine.sampling import prompt_token_logprobs

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def fast_path_problem(model) -> str | None:
    """Why ``model`` cannot run on the slot engine (None when it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one of {SUPPORTED}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    window = getattr(cfg, "sliding_window", None)
    if window and (kind == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return "a sliding attention window"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope_type {rope!r}"
    if getattr(getattr(model, "lm_head", None), "weight", None) is None:
        return "no lm_head weight"
    return None


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: object  # Linear or a quantized equivalent
    o: object
    mlp_norm: torch.Tensor
    gate_up: object
    down: object
    q_norm: torch.Tensor | None = None  # Qwen3: RMSNorm over each head
    k_norm: torch.Tensor | None = None
    index: int = 0


class SlotDecoder:
    """The decoder's math over slot-indexed KV caches. ``linear`` turns an nn.Linear (or several,
    fused) into a callable; the default keeps the weights dense."""

    def __init__(self, model, slots: int, max_len: int, linear=None):
        cfg = model.config
        linear = linear or fused_dense
        inner = model.model
        self.dtype = inner.embed_tokens.weight.dtype
        self.device = inner.embed_tokens.weight.device
        self.eps = float(cfg.rms_norm_eps)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.embed = inner.embed_tokens.weight.detach()
        self.layers = []
        for index, block in enumerate(inner.layers):
            a, m = block.self_attn, block.mlp
            self.layers.append(
                Layer(
                    attn_norm=block.input_layernorm.weight.detach(),
                    qkv=linear(a.q_proj, a.k_proj, a.v_proj),
                    o=linear(a.o_proj),
                    mlp_norm=block.post_attention_layernorm.weight.detach(),
                    gate_up=linear(m.gate_proj, m.up_proj),
                    down=linear(m.down_proj),
                    q_norm=getattr(getattr(a, "q_norm", None), "weight", None),
                    k_norm=getattr(getattr(a, "k_norm", None), "weight", None),
                    index=index,
                )
            )
        self.norm = inner.norm.weight.detach()
        # LoRA adapters (lora.py): the engine's AdapterBank, its adapters stacked per fused
        # projection (rebuilt when the bank's version moves), and for the forward running now
        # each row's adapter slot (None: every row is the base model's)
        self.bank = None
        self._stacks: dict[tuple[int, str], object] = {}
        self._stacks_version = -1
        self._layouts: dict[tuple, torch.Tensor] = {}  # adapter slot layout -> its tensor
        self._masks: dict[int, torch.Tensor] = {}  # this forward's mask per layout tensor
        self._rows = None
        inter = cfg.intermediate_size
        self.parts = {  # fused projection -> (PEFT module, start, size) of its output
            "qkv": [
                ("q_proj", 0, self.q_size),
                ("k_proj", self.q_size, self.kv_size),
                ("v_proj", self.q_size + self.kv_size, self.kv_size),
            ],
            "o": [("o_proj", 0, cfg.hidden_size)],
            "gate_up": [("gate_proj", 0, inter), ("up_proj", inter, inter)],
            "down": [("down_proj", 0, cfg.hidden_size)],
        }
        self.lm_head = linear(model.lm_head)
        self.slots, self.max_len = slots, max_len
        positions = torch.arange(max_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_len, head_dim]
        # CPU: the cache stays fp32 even for bf16 weights: torch's CPU batched matmuls copy
        # strided bf16 views (measured: 643 us per layer's attention for 32 rows in bf16, 174 in
        # fp32). On GPUs it is kept in the model's dtype.
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        shape = (slots, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]

    # ------------------------------------------------------------ building blocks

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: normalize in fp32, scale in the model's dtype
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _lora(self, layer: Layer, fused: str, x: torch.Tensor, out: torch.Tensor):
        """``out`` (the fused projection ``fused`` of ``x``, rows first) plus each adapted
        row's LoRA delta, (x A^T) B^T * scale: one stacked matmul pair for all the adapters
        in the batch (lora.Stack)."""
        if self._rows is None:
            return out
        if self._stacks_version != self.bank.version:
            self._stacks, self._layouts = {}, {}
            self._stacks_version, self._masks = self.bank.version, {}
        key = (layer.index, fused)
        if key not in self._stacks:
            lora = stack(self.bank.slots, layer.index, self.parts[fused])
            if lora is not None:  # layers of the same adapter layout share one slot tensor
                lora.slot = self._layouts.setdefault(tuple(lora.slot.tolist()), lora.slot)
            self._stacks[key] = lora
        lora = self._stacks[key]
        if lora is None:
            return out
        mask = self._masks.get(id(lora.slot))  # one per layout and forward, not per layer
        if mask is None:
            mask = self._masks[id(lora.slot)] = lora.mask(self._rows, x.dtype)
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        if threads == 1:
            return lora.add_delta(x, out, mask)
        # CPU: these matmuls are tiny ([rows, in] x [in, 4 adapters x rank]); on the decode
        # thread's throttled OpenMP workers (see core.GenerationEngine) one takes ~250 us on
        # two threads and ~35 us on one (measured, 2 cores; docs/engines.md)
        torch.set_num_threads(1)
        try:
            return lora.add_delta(x, out, mask)
        finally:
            torch.set_num_threads(threads)

    @property
    def row_slots(self) -> torch.Tensor | None:
        """Each row's adapter slot for the forward running now (None: no row has one)."""
        return self._rows

    @row_slots.setter
    def row_slots(self, rows: torch.Tensor | None) -> None:
        self._rows, self._masks = rows, {}

    def _qkv(self, layer: Layer, x: torch.Tensor, cos, sin):
        """x [..., hidden] -> q [..., heads, d], k / v [..., kv_heads, d], rotated."""
        h = self._rms(x, layer.attn_norm)
        qkv = self._lora(layer, "qkv", h, layer.qkv(h))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (self.heads, self.head_dim))
        k = k.unflatten(-1, (self.kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.kv_heads, self.head_dim))
        if layer.q_norm is not None:
            q, k = self._rms(q, layer.q_norm), self._rms(k, layer.k_norm)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        h = self._rms(x, layer.mlp_norm)
        gate, up = self._lora(layer, "gate_up", h, layer.gate_up(h)).chunk(2, dim=-1)
        act = F.silu(gate) * up
        return self._lora(layer, "down", act, layer.down(act))

    def _o(self, layer: Layer, attn: torch.Tensor) -> torch.Tensor:
        return self._lora(layer, "o", attn, layer.o(attn))

    # ------------------------------------------------------------ prefill and decode

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor):
        """Prompts ``tokens`` [J, L] (right-padded; real lengths ``lengths`` [J]) into ``slots``.
        Returns the final hidden states [J, L, hidden] (normed)."""
        width = tokens.shape[1]
        x = self.embed[tokens]
        cos, sin = self.cos[:width, None, :], self.sin[:width, None, :]
        cols = torch.arange(width, device=tokens.device)
        mask = (cols[None, :] <= cols[:, None])[None] & (
            cols[None, None, :] < lengths[:, None, None]
        )
        mask = mask[:, None]  # [J, 1, L, L]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # [J, L, heads, d]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            self.k[i][slots, :, :width] = k.to(self.kv_dtype)
            self.v[i][slots, :, :width] = v.to(self.kv_dtype)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads
            )
            x = x + self._o(layer, out.transpose(1, 2).flatten(2))
            x = x + self._mlp(layer, x)
        return self._rms(x, self.norm)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """One token for each of the slots ``[0, hi)`` (``hi = len(tokens)``) at ``positions``
        [hi]; attends to columns ``< width``. Returns the final hidden states [hi, hidden]."""
        hi = tokens.shape[0]
        rows = torch.arange(hi, device=tokens.device)
        x = self.embed[tokens]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        cols = torch.arange(width, device=tokens.device)
        bias = torch.zeros((hi, 1, 1, width), dtype=torch.float32, device=tokens.device)
        bias.masked_fill_(cols[None, None, None, :] > positions[:, None, None, None], -torch.inf)
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # [hi, heads, d]
            self.k[i][rows, :, positions] = k.to(self.kv_dtype)
            self.v[i][rows, :, positions] = v.to(self.kv_dtype)
            keys, values = self.k[i][:hi, :, :width], self.v[i][:hi, :, :width]
            # One query per row: plain batched matmuls beat SDPA's kernels here (measured 0.18
            # vs 0.26-0.77 ms per layer for 32 rows); queries of a KV head's group share it.
            q = q.unflatten(1, (self.kv_heads, groups)).to(self.kv_dtype) * self.scale
            scores = (q @ keys.transpose(-1, -2)).float() + bias  # [hi, kv, g, width]
            out = scores.softmax(-1).to(values.dtype) @ values  # [hi, kv, g, d]
            x = x + self._o(layer, out.flatten(1).to(self.dtype))
            x = x + self._mlp(layer, x)
        return self._rms(x, self.norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class SlotRunner:
    """The running batch of the built-in engine on the slot decoder: the same interface as the
    transformers path (``HFRunner``): ``rows``, ``prefill``, ``decode``, ``advance``, ``keep``."""

    def __init__(
        self,
        model,
        max_rows: int,
        max_len: int,
        pad_id: int,
        linear=None,
        prefill_tokens: int = 4096,
        compile: bool = False,
    ):
        if compile and linear is None:
            linear = fused_unpacked  # inductor cannot lower oneDNN's packed linear
        self.decoder = SlotDecoder(model, max_rows, max_len, linear)
        if compile:
            # Shapes vary (rows, columns): one dynamic graph instead of a compile per shape.
            self.decoder.decode = torch.compile(self.decoder.decode, dynamic=True)
        self.max_len, self.pad_id, self.prefill_tokens = max_len, pad_id, prefill_tokens
        device = self.decoder.device
        self.rows: list = []  # requests in decode order (ascending slot)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.next_tokens = torch.full((max_rows,), pad_id, dtype=torch.long, device=device)
        self.free = list(range(max_rows))
        self.slot_adapter = [0] * max_rows  # the adapter slot (lora.py) of each KV slot's row

    def __len__(self) -> int:
        return len(self.rows)

    def kv_usage(self) -> float:
        return float(self.lengths.sum()) / (self.lengths.numel() * self.max_len)

    def prefill(self, joiners: list) -> torch.Tensor:
        """Put ``joiners`` into free slots (in groups of at most ``prefill_tokens`` padded
        tokens); return their last-position logits [J, vocab] in joiner order."""
        out, group, width = [], [], 0
        for req in joiners:
            w = max(width, len(req.prompt_ids))
            if group and w * (len(group) + 1) > self.prefill_tokens:
                out.append(self._prefill_group(group))
                group, w = [], len(req.prompt_ids)
            group.append(req)
            width = w
        if group:
            out.append(self._prefill_group(group))
        self.rows.sort(key=lambda r: r.slot)
        return torch.cat(out)

    def _prefill_group(self, group: list) -> torch.Tensor:
        device = self.decoder.device
        self.free.sort()
        slots = [self.free.pop(0) for _ in group]
        lengths = [len(r.prompt_ids) for r in group]
        tokens = torch.full((len(group), max(lengths)), self.pad_id, dtype=torch.long)
        for j, r in enumerate(group):
            tokens[j, : lengths[j]] = torch.tensor(r.prompt_ids)
            r.slot = slots[j]
        tokens, lens = tokens.to(device), torch.tensor(lengths, device=device)
        slot_index = torch.tensor(slots, device=device)
        self.decoder.row_slots = row_slots([r.adapter for r in group], device)
        try:
            hidden = self.decoder.prefill(tokens, lens, slot_index)
        except BaseException:
            for r in group:  # not running: give the slots back
                self.free.append(r.slot)
                r.slot = None
            raise
        last = hidden[torch.arange(len(group), device=device), lens - 1]
        for j, r in enumerate(group):
            self.slot_adapter[r.slot] = r.adapter
            if r.row.params.prompt_logprobs is not None:
                full = self.decoder.logits(hidden[j, : lengths[j]])
                r.row.prompt_logprobs = prompt_token_logprobs(
                    full, r.prompt_ids, r.row.params.prompt_logprobs
                )
        self.lengths[slot_index] = lens
        self.rows.extend(group)
        return self.decoder.logits(last)

    def all_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position of full blocks ``ids`` [B, T] (scoring; B <= free slots).
        Uses free slots' cache space and leaves them free."""
        slots = torch.tensor(sorted(self.free)[: ids.shape[0]], device=ids.device)
        lengths = torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
        self.decoder.row_slots = None  # scoring is the base model's
        return self.decoder.logits(self.decoder.prefill(ids, lengths, slots))

    def decode(self) -> torch.Tensor:
        """One decode step for every row; logits [rows, vocab] in ``rows`` order."""
        hi = self.rows[-1].slot + 1
        positions = self.lengths[:hi]
        width = int(positions.max()) + 1
        if width > self.max_len:
            raise RuntimeError(f"a row outgrew the KV cache ({self.max_len} tokens)")
        self.decoder.row_slots = row_slots(self.slot_adapter[:hi], self.decoder.device)
        hidden = self.decoder.decode(self.next_tokens[:hi], positions, width)
        index = self._slot_index()
        self.lengths[index] += 1
        if len(self.rows) == hi:
            return self.decoder.logits(hidden)
        return self.decoder.logits(hidden.index_select(0, index))

    def advance(self, reqs: list, tokens: torch.Tensor) -> None:
        """``tokens`` [len(reqs)] are fed for ``reqs`` at the next step."""
        slots = torch.tensor([r.slot for r in reqs], device=self.decoder.device)
        self.next_tokens[slots] = tokens

    def keep(self, indices: list[int]) -> None:
        """Keep the rows at ``indices``; the others' slots are free again (nothing moves)."""
        kept = [self.rows[i] for i in indices]
        gone = {id(r) for r in kept}
        for req in self.rows:
            if id(req) not in gone:
                self._release(req)
        self.rows = kept

    def reset(self) -> None:
        for req in self.rows:
            self._release(req)
        self.rows = []

    def _release(self, req) -> None:
        self.slot_adapter[req.slot] = 0
        self.lengths[req.slot] = 0
        self.next_tokens[req.slot] = self.pad_id
        self.free.append(req.slot)
        req.slot = None

    def _slot_index(self) -> torch.Tensor:
        return torch.tensor([r.slot for r in self.rows], device=self.decoder.device)
