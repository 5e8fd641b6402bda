"""Exactly-once data positions for the training loop, read by each rank itself (no Ray).

Each rank reads the train shards with pyarrow on a thread of its own, in an epoch order that
every rank derives from the seed alone: a seeded permutation of the shards' row groups, rows
shuffled within windows of ``train.shuffle_buffer`` rows. No Ray Data executor runs beside the
training step (it took CPU from it), and a rank only turns the rows at its own positions into
tensors.
"""

from __future__ import annotations

import logging
import queue
import threading
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

    def __init__(self, cfg: TrainConfig, rank: int, world: int, rows: int, source):
        """`source(epoch)` yields the epoch's rows as numpy batches, the same on every rank
        (a ShardReader)."""
        self.cfg, self.rank, self.world, self.rows = cfg, rank, world, rows
        self.source = source
        self.per_step = cfg.batch_size * cfg.grad_accum * world
        if rows < self.per_step:
            raise TrainError(f"{rows} training rows cannot fill one step of {self.per_step}")

    def steps(self, epoch: int, start: int):
        """Yield (epoch, positions, micro_batches) per optimizer step, from epoch position
        `start` to the epoch's end. Positions, not step counts, mark progress, so a resume
        with a different number of workers (elastic) still consumes each sample once."""
        limit = start + (self.rows - start) // self.per_step * self.per_step
        self.probe: list[int] = []
        micro = rank_micro_batches(
            self.source(epoch, start),
            self.rank,
            self.world,
            start,
            limit,
            self.cfg.batch_size,
            self.probe,
        )
        group: list = []
        for item in prefetch(micro, depth=4):
            group.append(item)
            if len(group) == self.cfg.grad_accum:
                positions = np.concatenate([g[0] for g in group])
                yield epoch, positions, [(g[1], g[2]) for g in group]
                group = []


class ShardReader:
    """The epoch order of a split's parquet shards (local or s3://), read with pyarrow.

    Units are (file, row group); an epoch visits them in a permutation seeded by seed + epoch,
    and rows are shuffled within windows of at least `window` rows (0 = corpus order). The
    order depends on the shards and the seed only, so every rank sees the same one."""

    def __init__(self, split_dir: str, columns: list[str], seed: int, window: int):
        import pyarrow.parquet as pq

        from aigc_ray.storage import filesystem_for, list_files, scheme_prefix

        self.filesystem, _ = filesystem_for(split_dir)
        cut = len(scheme_prefix(split_dir))
        self.columns, self.seed, self.window = columns, seed, window
        self.units: list[tuple[str, int, int]] = []  # (path, row group, rows)
        for uri, _ in list_files(split_dir, keep=lambda p: p.endswith(".parquet")):
            path = uri[cut:]
            with self.filesystem.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            self.units += [
                (path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
            ]

    def _plan(self, epoch: int):
        """(rng, windows): the epoch's windows as (unit indices, rows), from the shards'
        metadata alone, and the rng that then shuffles rows within each window in turn."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.units)) if self.window else range(len(self.units))
        windows, pending, rows = [], [], 0
        for k in order:
            pending.append(int(k))
            rows += self.units[k][2]
            if rows >= max(self.window, 1):
                windows.append((pending, rows))
                pending, rows = [], 0
        if pending:
            windows.append((pending, rows))
        return (rng if self.window else None), windows

    def __call__(self, epoch: int, start: int = 0):
        """The epoch's rows as numpy batches (one per window). Windows wholly before position
        `start` (consumed before a resume) are not read: `{"skipped": rows}` stands for each."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng, windows = self._plan(epoch)
        pos, files = 0, {}
        for units, rows in windows:
            if pos + rows <= start:
                if rng is not None:
                    rng.permutation(rows)  # keep the rng where reading the window leaves it
                yield {"skipped": rows}
                pos += rows
                continue
            tables = []
            for k in units:
                path, group, _ = self.units[k]
                if path not in files:
                    files = {path: pq.ParquetFile(self.filesystem.open_input_file(path))}
                tables.append(files[path].read_row_group(group, columns=self.columns))
            yield _window(pa.concat_tables(tables), rng)
            pos += rows


def _window(table, rng) -> dict:
    """A numpy batch {column: [rows, T] array} of `table`, rows permuted by `rng` (if any)."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        out[name] = flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
    if rng is not None:
        perm = rng.permutation(table.num_rows)
        out = {k: v[perm] for k, v in out.items()}
    return out


def prefetch(items, depth: int):
    """Iterate `items` on a background thread, `depth` ahead (reading and collating overlap
    the training step; pyarrow and numpy release the GIL for most of it). An exception in the
    thread is raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        q.put(done)

    t = threading.Thread(target=run, name="aigc-ray-prefetch", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


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
    of the first rows read (the same on every rank when orders agree).
    """
    pos, buf = 0, []
    for batch in stream:
        if "skipped" in batch:  # a window before `start`, not read
            pos += batch["skipped"]
            continue
        ids, labels = batch["input_ids"], batch.get("labels")
        if probe is not None and not probe:
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
