"""The running batch of the continuous-batching scheduler: rows, KV cache, attention mask.

Rows are left-padded: every row's real tokens end at the last cache column, so one decode step
appends one column for all rows. Joining rows (prefilled separately) are padded on the left to the
longer of the two caches and concatenated on the batch dimension; leaving rows are dropped with an
index select, and columns that became padding for every remaining row are trimmed from the left.
This cache surgery works on transformers' DynamicCache with full-attention layers
(``check_cache_supported``); sliding-window or recurrent caches are refused at engine start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    def advance(self, tokens: torch.Tensor) -> None:
        """After a decode step: the fed tokens are now cached; ``tokens`` are fed next."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.next_positions = self.next_positions + 1
        self.next_tokens = tokens
