"""Tokenize and pack: pure packing functions and the callable-class Ray Data UDF.

Packing is exact: each batch packs its documents (EOS after each) into full `seq_len` blocks
and emits its leftover as one "tail" row carrying the batch's counts. The driver concatenates
all tails in order and packs them too, so across the corpus only the final partial block of
each split (< seq_len tokens) is dropped, and it is counted.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from aigc_ray.data.formats import (
    IGNORE,
    FormatError,
    default_pieces,
    encode_pieces,
    parse_messages,
    template_pieces,
)
from aigc_ray.data.quality import doc_split

SPLITS = ("train", "val")
STAT_KEYS = ("docs_kept", "tokens", "truncated")


def pack_tokens(docs: list[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents with EOS after each; return (full blocks [n, seq_len], leftover)."""
    if not docs:
        return np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32)
    eos = np.array([eos_id], np.int32)
    parts = []
    for d in docs:  # np.asarray per list is ~5x faster than one generator over every token
        parts += (np.asarray(d, np.int32), eos)
    return split_blocks(np.concatenate(parts), seq_len)


def split_blocks(flat: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Full [n, seq_len] blocks of a flat token array, and the leftover."""
    n_full = len(flat) // seq_len
    return flat[: n_full * seq_len].reshape(n_full, seq_len), flat[n_full * seq_len :]


def pad_examples(ids: list[list[int]], labels: list[list[int]], seq_len: int, pad_id: int):
    """One example per row: truncate to seq_len, pad ids with pad_id and labels with -100."""
    out_ids = np.full((len(ids), seq_len), pad_id, np.int32)
    out_lab = np.full((len(ids), seq_len), IGNORE, np.int32)
    truncated = 0
    for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
        truncated += len(a) > seq_len
        out_ids[i, : min(len(a), seq_len)] = a[:seq_len]
        out_lab[i, : min(len(b), seq_len)] = b[:seq_len]
    return out_ids, out_lab, truncated


def list_column(rows) -> pa.Array:
    """A list<int32> arrow column from a sequence of 1-D int arrays (variable lengths allowed)."""
    rows = list(rows)
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


class _Out:
    """Output rows of the tokenize UDF: blocks (is_tail False) and per-split tails with counts."""

    def __init__(self, with_labels: bool):
        self.ids, self.labels, self.split, self.tail = [], [], [], []
        self.stats: list[dict] = []
        self.with_labels = with_labels

    def blocks(self, split: str, ids: np.ndarray, labels: np.ndarray | None) -> None:
        self.ids += list(ids)
        self.labels += list(labels) if labels is not None else []
        n = len(ids)
        self.split += [split] * n
        self.tail += [False] * n
        self.stats += [{}] * n

    def tail_row(self, split: str, ids: np.ndarray, labels: np.ndarray | None, stats: dict) -> None:
        self.ids.append(ids)
        if labels is not None:
            self.labels.append(labels)
        self.split.append(split)
        self.tail.append(True)
        self.stats.append(stats)

    def table(self) -> pa.Table:
        cols = {"input_ids": list_column(self.ids)}
        if self.with_labels:
            cols["labels"] = list_column(self.labels)
        cols["split"] = pa.array(self.split, pa.string())
        cols["is_tail"] = pa.array(self.tail, pa.bool_())
        for k in STAT_KEYS:
            cols[k] = pa.array([s.get(k, 0) for s in self.stats], pa.int64())
        return pa.table(cols)


class TokenizePackUDF:
    """Callable-class UDF: split, tokenize and pack (pretrain) or format (sft) documents.

    Heavy state (the Rust tokenizer, the chat template) is built once per actor in __init__.
    """

    def __init__(
        self,
        tokenizer_json: str,
        eos_token: str,
        pad_token: str,
        seq_len: int,
        val_fraction: float,
        seed: int,
        fmt: str = "pretrain",
        packing: str = "pack",
        chat_template: str | None = None,
    ):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eos_token, self.eos_id = eos_token, self.tok.token_to_id(eos_token)
        self.pad_id = self.tok.token_to_id(pad_token)
        self.seq_len, self.val_fraction, self.seed = seq_len, val_fraction, seed
        self.fmt, self.packing = fmt, packing
        self.hf = None
        if chat_template:
            from transformers import PreTrainedTokenizerFast

            self.hf = PreTrainedTokenizerFast(
                tokenizer_object=self.tok, eos_token=eos_token, chat_template=chat_template
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for t in texts:
            by_split[doc_split(t, self.val_fraction, self.seed)].append(t)
        out = _Out(with_labels=self.fmt == "sft")
        for split, docs in by_split.items():
            if self.fmt == "sft":
                self._sft(split, docs, out)
            else:
                self._pretrain(split, docs, out)
        return out.table()

    def _pretrain(self, split: str, docs: list[str], out: _Out) -> None:
        encoded = [e.ids for e in self.tok.encode_batch_fast(docs, add_special_tokens=False)]
        full, rest = pack_tokens(encoded, self.eos_id, self.seq_len)
        out.blocks(split, full, None)
        tokens = sum(len(e) + 1 for e in encoded)
        out.tail_row(split, rest, None, {"docs_kept": len(docs), "tokens": tokens})

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _sft(self, split: str, docs: list[str], out: _Out) -> None:
        ids, labels = [], []
        for raw in docs:
            msgs = parse_messages(raw)  # validated upstream; raises only on a logic error
            pieces = (
                template_pieces(msgs, self.hf) if self.hf else default_pieces(msgs, self.eos_token)
            )
            a, b = encode_pieces(pieces, self._encode)
            ids.append(np.asarray(a, np.int32))
            labels.append(np.asarray(b, np.int32))
        tokens = sum(len(a) for a in ids)
        stats = {"docs_kept": len(docs), "tokens": tokens}
        if self.packing == "pad":
            full_ids, full_lab, stats["truncated"] = pad_examples(
                ids, labels, self.seq_len, self.pad_id
            )
            out.blocks(split, full_ids, full_lab)
            out.tail_row(split, np.zeros(0, np.int32), np.zeros(0, np.int32), stats)
            return
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        flat_lab = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        full_ids, rest_ids = split_blocks(flat_ids, self.seq_len)
        full_lab, rest_lab = split_blocks(flat_lab, self.seq_len)
        out.blocks(split, full_ids, full_lab)
        out.tail_row(split, rest_ids, rest_lab, stats)


def check_sft_row(text: str) -> str | None:
    """Reason an SFT row is malformed, or None (used by the clean step to quarantine it)."""
    try:
        parse_messages(text)
    except (FormatError, ValueError) as e:
        return f"bad messages: {e}"
    return None
