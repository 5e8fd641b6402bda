"""The built-in engine's general path (any transformers causal LM): the running batch over
transformers' own DynamicCache. Models the slot decoder (slots.py) does not cover run here.

Rows are left-padded: every row's real tokens end at the last cache column, so one decode step
appends one column for all rows. Joining rows (prefilled separately) are padded on the left to the
longer of the two caches and concatenated on the batch dimension; leaving rows are dropped with an
index select, and columns that became padding for every remaining row are trimmed from the left.
This cache surgery works on transformers' DynamicCache with full-attention layers
(``check_cache_supported``); sliding-window or recurrent caches are refused at engine start.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from aigc_ray.engine.sampling import prompt_token_logprobs


def left_pad(encoded: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids) tensors."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def check_cache_supported(cache) -> None:
    """Raise NotImplementedError unless ``cache`` is a DynamicCache of full-attention layers."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise NotImplementedError(
            f"continuous batching needs a KV cache of full-attention DynamicLayer layers; this "
            f"model's cache has {kinds} (sliding-window and recurrent models are not supported)"
        )


def _map_layers(cache, fn) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


class RunningBatch:
    """KV cache + mask + next input token and position of every running row (row i = rows[i])."""

    def __init__(self, rows: list, cache, mask: torch.Tensor, next_tokens, next_positions):
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, T] over the cache columns
        self.next_tokens = next_tokens  # [B] token to feed at the next step
        self.next_positions = next_positions  # [B] its position id

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def pad_left(self, n: int) -> None:
        if n <= 0:
            return
        _map_layers(self.cache, lambda t: F.pad(t, (0, 0, n, 0)))
        self.mask = F.pad(self.mask, (n, 0))

    def merge(self, other: RunningBatch) -> None:
        """Append ``other``'s rows (their cache is consumed)."""
        self.pad_left(other.width - self.width)
        other.pad_left(self.width - other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        self.rows += other.rows

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` and drop columns that are padding for all of them."""
        if len(indices) == len(self.rows):
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        _map_layers(self.cache, lambda t: t.index_select(0, index))
        self.mask = self.mask.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        self.rows = [self.rows[i] for i in indices]
        if self.rows:
            used = self.mask.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else self.width
            if first > 0:
                _map_layers(self.cache, lambda t: t[:, :, first:])
                self.mask = self.mask[:, first:]


class HFRunner:
    """The running batch on transformers' forward + DynamicCache surgery (any causal LM whose
    cache is full-attention DynamicLayers): same interface as the slot path's SlotRunner."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        forward_params = inspect.signature(model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in forward_params
        # transformers >= 5.2x renamed past_key_values -> cache (old name warns); support both.
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"
        self.batch: RunningBatch | None = None

    @property
    def rows(self) -> list:
        return self.batch.rows if self.batch else []

    def __len__(self) -> int:
        return len(self.rows)

    def kv_usage(self) -> float | None:
        return None

    def forward(self, input_ids, mask, positions, cache):
        """One model call; returns (last-position logits [rows, vocab], updated KV cache)."""
        extra = {self._cache_name: cache}
        if self._keep_last_logits:
            extra["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :], getattr(out, self._cache_name)

    def probe(self) -> None:
        """Fail at start, not at the first request, if the model's cache cannot be batched."""
        ids = torch.tensor([[self.pad_id]], device=self.device)
        _, cache = self.forward(ids, torch.ones_like(ids), torch.zeros_like(ids), None)
        check_cache_supported(cache)

    def prefill(self, joiners: list) -> torch.Tensor:
        ids, mask, positions = left_pad([r.prompt_ids for r in joiners], self.pad_id, self.device)
        logits, cache = self.forward(ids, mask, positions, None)
        for req in joiners:
            if req.row.params.prompt_logprobs is not None:
                req.row.prompt_logprobs = self._score_prompt(req)
        placeholder = torch.zeros(len(joiners), dtype=torch.long, device=self.device)
        part = RunningBatch(joiners, cache, mask, placeholder, positions[:, -1] + 1)
        if self.batch is None or not self.batch.rows:
            self.batch = part
        else:
            self.batch.merge(part)
        return logits

    def all_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position of full blocks ``ids`` [B, T] (scoring)."""
        return self.model(input_ids=ids, use_cache=False).logits

    def _score_prompt(self, req) -> list:
        """Prompt logprobs: one forward over the whole prompt (rare: evaluation requests)."""
        ids = torch.tensor([req.prompt_ids], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0]
        return prompt_token_logprobs(logits, req.prompt_ids, req.row.params.prompt_logprobs)

    def decode(self) -> torch.Tensor:
        batch = self.batch
        feed_mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        logits, batch.cache = self.forward(
            batch.next_tokens[:, None], feed_mask, batch.next_positions[:, None], batch.cache
        )
        batch.mask = feed_mask
        batch.next_positions = batch.next_positions + 1
        return logits

    def advance(self, reqs: list, tokens: torch.Tensor) -> None:
        """``tokens`` [len(reqs)] are fed for ``reqs`` at the next step."""
        rows = self.batch.rows
        if len(reqs) == len(rows):
            self.batch.next_tokens = tokens
            return
        where = {id(r): i for i, r in enumerate(rows)}
        index = torch.tensor([where[id(r)] for r in reqs], device=tokens.device)
        self.batch.next_tokens[index] = tokens

    def keep(self, indices: list[int]) -> None:
        self.batch.keep(indices)

    def reset(self) -> None:
        self.batch = None
