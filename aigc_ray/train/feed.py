"""Exactly-once data positions for the training loop (no Ray imports)."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import torch

from aigc_ray.config import TrainConfig
from aigc_ray.train.steps import TrainError, collate

log = logging.getLogger(__name__)


class _Feed:
    """Exactly-once data positions. Every rank iterates the same seeded epoch order; global
    position p belongs to rank p % world; a resumed run skips the positions its checkpointed
    steps consumed, so no sample is skipped or repeated within an epoch. The epoch's last
    partial global batch (< batch_size x grad_accum x world rows) is not used."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, rows: int):
        self.cfg, self.rank, self.world, self.rows = cfg, rank, world, rows
        self.per_step = cfg.batch_size * cfg.grad_accum * world
        if rows < self.per_step:
            raise TrainError(f"{rows} training rows cannot fill one step of {self.per_step}")

    def steps(self, shard, epoch: int, start: int):
        """Yield (epoch, positions, micro_batches) per optimizer step, from epoch position
        `start` to the epoch's end. Positions, not step counts, mark progress, so a resume
        with a different number of workers (elastic) still consumes each sample once."""
        limit = start + (self.rows - start) // self.per_step * self.per_step
        stream = shard.iter_batches(
            batch_size=1024,
            batch_format="numpy",
            local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
            local_shuffle_seed=self.cfg.seed + epoch,
        )
        self.probe: list[int] = []
        micro = rank_micro_batches(
            stream, self.rank, self.world, start, limit, self.cfg.batch_size, self.probe
        )
        group: list = []
        for item in micro:
            group.append(item)
            if len(group) == self.cfg.grad_accum:
                positions = np.concatenate([g[0] for g in group])
                yield epoch, positions, [(g[1], g[2]) for g in group]
                group = []


def rank_micro_batches(
    stream,
    rank: int,
    world: int,
    start: int,
    limit: int,
    batch_size: int,
    probe: list | None = None,
):
    """(positions, input_ids [B,T], labels [B,T] | None) micro-batches of one rank.

    Position p of the epoch stream goes to rank p % world; p < start (already consumed) and
    p >= limit (the epoch's partial last global batch) are skipped. `probe` receives a digest
    of the epoch's first rows (the same on every rank when orders agree).
    """
    pos, buf = 0, []
    for batch in stream:
        ids, labels = batch["input_ids"], batch.get("labels")
        if pos == 0 and probe is not None:
            head = np.concatenate([np.asarray(r, np.int64) for r in ids[:16]])
            probe.append(int(zlib.crc32(head.tobytes())))
        n = len(ids)
        positions = np.arange(pos, pos + n)
        mine = np.flatnonzero(
            (positions % world == rank) & (positions >= start) & (positions < limit)
        )
        for i in mine:
            buf.append((positions[i], ids[i], None if labels is None else labels[i]))
            if len(buf) == batch_size:
                yield _stack(buf)
                buf = []
        pos += n
        if pos >= limit:
            return


def _stack(buf: list):
    positions = np.array([b[0] for b in buf], np.int64)
    batch = {"input_ids": [b[1] for b in buf]}
    if buf[0][2] is not None:
        batch["labels"] = [b[2] for b in buf]
    return (positions, *collate(batch))


def check_same_order(digest: int, device) -> None:
    """Fail loudly if ranks see different epoch orders (exactly-once relies on it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if len({int(t) for t in everyone}) != 1:
        raise RuntimeError(
            "training ranks see different data orders; exactly-once needs a "
            "deterministic order (preserve_order) on every rank"
        )
