"""The data stage on Ray Data: read -> clean/redact/filter -> dedup -> tokenize/pack -> parquet.

    files --read_clean (tasks: read_files + clean_batch)--> rows (document or quarantine):
          redacted text, status, hash, PII counts per kind
          --materialize--> driver: exact duplicates (by hash, order key: deterministic)
          --candidate_signatures (tasks)--> MinHash of the remaining ok rows
          --> near duplicates (on the driver, or banded over a Ray Data hash shuffle)
          --keep rows--> tokenize_pack (tasks; one TokenizePackUDF per worker process)
          --materialize--> shards per split + tails

Every row is accounted for in the manifest: read = malformed + filtered (per filter) +
exact duplicates + near duplicates + kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aigc_ray.config import DataConfig, write_resolved
from aigc_ray.data.dedup import (
    MinHashParams,
    band_rows,
    bucket_pairs,
    exact_duplicates,
    near_duplicates,
    near_duplicates_from_pairs,
    signatures,
    text_hash,
)
from aigc_ray.data.pack import SPLITS, TokenizePackUDF, check_sft_row, list_column, split_blocks
from aigc_ray.data.pii import PiiRules, redact_batch
from aigc_ray.data.quality import QualityRules, build_filters, clean_text, first_failure
from aigc_ray.data.readers import DataError, InputFile, read_files, resolve_inputs
from aigc_ray.storage import (
    filesystem_for,
    is_uri,
    scheme_prefix,
    upload_dir,
    writer_filesystem,
)

log = logging.getLogger(__name__)


def quality_rules(cfg: DataConfig) -> QualityRules:
    return QualityRules(
        cfg.min_chars,
        cfg.max_chars,
        cfg.max_line_length,
        cfg.min_alnum_fraction,
        cfg.max_repeated_line_fraction,
        tuple(cfg.blocklist),
    )


def pii_rules(cfg: DataConfig) -> PiiRules | None:
    p = cfg.pii
    if not p.enabled or not p.kinds:
        return None
    return PiiRules(tuple(p.kinds), p.action, p.placeholder, p.phone_region)


def minhash_params(cfg: DataConfig) -> MinHashParams:
    return MinHashParams(
        cfg.minhash_num_perm,
        cfg.minhash_bands,
        cfg.shingle_ngram,
        cfg.shingle,
        cfg.near_dedup_threshold,
        cfg.seed,
    )


# ---------------------------------------------------------------- batch functions


def clean_batch(
    batch: pa.Table,
    rules: QualityRules,
    sft: bool,
    pii: PiiRules | None = None,
) -> pa.Table:
    """Ray Data batch fn: clean text, redact PII (``pii``); set `status` (ok | malformed |
    filtered:<name>), hash and, with ``pii``, a `pii_<kind>` count column per kind (MinHash
    signatures come later, for the near-dedup candidates only: candidate_signatures)."""
    texts, status, reasons = [], [], []
    for text, reason in zip(
        batch.column("text").to_pylist(), batch.column("reason").to_pylist(), strict=True
    ):
        if reason is None and sft:
            reason = check_sft_row(text)  # parsed once; the reason goes to quarantine
        if reason is not None:
            texts.append(text if sft else None)
            status.append("malformed")
        else:
            texts.append(text if sft else clean_text(text))
            status.append("ok")
        reasons.append(reason)
    found = _redact(texts, status, pii, sft) if pii is not None else {}
    if not sft:
        filters = build_filters(rules)
        for i, (text, s) in enumerate(zip(texts, status, strict=True)):
            fail = first_failure(text, filters) if s == "ok" else None
            if fail:
                status[i] = f"filtered:{fail}"
    hashes = [text_hash(t) if s == "ok" else 0 for t, s in zip(texts, status, strict=True)]
    out = batch.drop(["text", "reason"]).append_column("text", pa.array(texts, pa.string()))
    out = out.append_column("reason", pa.array(reasons, pa.string()))
    out = out.append_column("status", pa.array(status, pa.string()))
    out = out.append_column("hash", pa.array(hashes, pa.int64()))
    for kind, counts in found.items():
        out = out.append_column(f"pii_{kind}", pa.array(counts, pa.int32()))
    return out


def candidate_signature_batch(batch: pa.Table, skip: np.ndarray, params: MinHashParams) -> pa.Table:
    """(order, sig) of the status-ok rows whose order is not in `skip` (the exact duplicates):
    only near-dedup candidates are shingled and hashed."""
    if "status" not in batch.column_names:  # an empty block without the reader's columns
        return pa.table({"order": pa.array([], pa.int64()), "sig": list_column([])})
    ok = pc.equal(batch["status"], "ok").to_numpy(zero_copy_only=False)
    ok &= ~np.isin(batch["order"].to_numpy(), skip)
    rows = batch.filter(pa.array(ok))
    sigs = signatures(rows["text"].to_pylist(), params).view(np.int32)
    return pa.table({"order": rows["order"], "sig": list_column(sigs)})


def candidate_signatures(cleaned, skip: np.ndarray, params: MinHashParams, workers=None) -> list:
    """The near-dedup signature step: one plain Ray task per block of the materialized cleaned
    dataset, at most `workers` in flight (default: the cluster's CPUs); refs to (order, sig)
    tables, in block order.

    Not a Ray Data map_batches: Ray Data 2.60 starts every execution with zero resource
    limits until its autoscaling coordinator reports the cluster's resources (1-3 s here), and
    until then runs one task per operator, so a signature pass of a few seconds ran serially
    (1.06x from 1 to 2 workers, where a process pool gives 2x).
    """
    import ray

    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1)(candidate_signature_batch)
    return bounded_tasks(task, cleaned.to_arrow_refs(), (ray.put(skip), params), workers)


def _redact(texts: list, status: list[str], pii: PiiRules, sft: bool) -> dict[str, np.ndarray]:
    """Redact the well-formed rows of ``texts`` in place (or, with action drop, mark the rows
    holding PII filtered:pii); return the findings per kind and row."""
    ok = [t if s == "ok" else None for t, s in zip(texts, status, strict=True)]
    redacted, found = redact_batch(pa.array(ok, pa.string()), pii, messages=sft)
    holds = np.zeros(len(texts), bool)
    for counts in found.values():
        holds |= counts > 0
    for i in np.flatnonzero(holds):
        if pii.action == "drop":
            status[i] = "filtered:pii"
        else:
            texts[i] = redacted[i]
    return found


def keep_rows(batch: pa.Table, drop_orders: np.ndarray) -> pa.Table:
    """Ray Data batch fn: status ok and not a duplicate; only the text goes on."""
    if "status" not in batch.column_names:  # an empty block without the reader's columns
        return pa.table({"text": pa.array([], pa.string())})
    ok = pc.equal(batch["status"], "ok").to_numpy(zero_copy_only=False)
    dup = np.isin(batch["order"].to_numpy(), drop_orders)
    return batch.filter(pa.array(ok & ~dup)).select(["text"])


def quarantined(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["status"], "malformed")).select(
        ["source", "line", "doc_id", "reason", "raw"]
    )


def tail_stats(batch: pa.Table) -> pa.Table:
    """Ray Data batch fn: the per-batch counts carried by the tail rows."""
    if "is_tail" not in batch.column_names:  # an empty block without the UDF's columns
        return pa.table({})
    return batch.filter(batch["is_tail"]).select(["split", "docs_kept", "tokens", "truncated"])


def select_rows(batch: pa.Table, split: str, is_tail: bool, columns: list[str]) -> pa.Table:
    """Ray Data batch fn: the rows of one split that are (not) tails, with `columns` only."""
    if "split" not in batch.column_names:  # an empty block without the UDF's columns
        return pa.table({c: pa.array([], pa.list_(pa.int32())) for c in columns})
    mask = pc.and_(pc.equal(batch["split"], split), pc.equal(batch["is_tail"], is_tail))
    return batch.filter(mask).select(columns)


# ---------------------------------------------------------------- driver steps


def read_clean(batch: pa.Table, read: dict, clean: dict):
    """Ray Data batch fn (tasks): file descriptors -> cleaned reader-schema tables.

    Reading and cleaning run in one function, one file at a time, so a task holds one file's
    rows and the stage needs no second pass (two fused map_batches with different batch sizes
    made Ray Data bundle every file into one task: the whole corpus on one core).
    """
    for table in read_files(batch, **read):
        yield clean_batch(table, **clean)


def _cleaned_dataset(files: list[InputFile], cfg: DataConfig):
    """One read+clean task per file (up to 200 blocks of files)."""
    import ray.data

    items = [{"path": f.path, "fmt": f.fmt, "size": f.size, "index": f.index} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 200))
    column = cfg.messages_column if cfg.format == "sft" else cfg.text_column
    read = {
        "column": column,
        "text_mode": cfg.text_mode,
        "strict": cfg.strict,
        "id_column": cfg.id_column,
    }
    clean = {
        "rules": quality_rules(cfg),
        "sft": cfg.format == "sft",
        "pii": pii_rules(cfg),
    }
    ds = ds.map_batches(
        read_clean, fn_kwargs={"read": read, "clean": clean}, batch_size=1, batch_format="pyarrow"
    )
    return ds


def _dedup(meta: pa.Table, cleaned, cfg: DataConfig) -> tuple[np.ndarray, int, int]:
    """Order keys to drop, and the exact / near duplicate counts (among status-ok rows)."""
    ok = pc.equal(meta["status"], "ok").to_numpy(zero_copy_only=False)
    order = meta["order"].to_numpy()[ok]
    drop_exact = (
        exact_duplicates(meta["hash"].to_numpy()[ok], order)
        if cfg.exact_dedup
        else np.zeros(len(order), bool)
    )
    near = np.zeros(0, np.int64)
    n_candidates = int((~drop_exact).sum())
    if cfg.near_dedup and n_candidates:
        exact = np.sort(order[drop_exact])
        refs = candidate_signatures(cleaned, exact, minhash_params(cfg), data_cpus(cfg))
        if n_candidates > cfg.near_dedup_driver_max_docs:
            near = _near_dedup_distributed(refs, cfg, n_candidates)
        else:
            t = gather(refs)
            sigs = _sig_matrix(t, cfg.minhash_num_perm)
            orders = t["order"].to_numpy() if t is not None else np.zeros(0, np.int64)
            near = orders[near_duplicates(sigs, orders, minhash_params(cfg))]
    drops = np.union1d(order[drop_exact], near)
    return drops, int(drop_exact.sum()), len(near)


def _sig_matrix(table: pa.Table | None, num_perm: int) -> np.ndarray:
    if table is None or table.num_rows == 0:
        return np.zeros((0, num_perm), np.uint32)
    flat = table["sig"].combine_chunks().flatten().to_numpy().view(np.uint32)
    return flat.reshape(table.num_rows, num_perm)


def band_batch(batch: pa.Table, bands: int, num_perm: int) -> pa.Table:
    """Ray Data batch fn: (order, sig) rows -> one (band, key, order) row per band."""
    return pa.table(band_rows(batch["order"].to_numpy(), _sig_matrix(batch, num_perm), bands))


def pairs_batch(batch: pa.Table) -> pa.Table:
    """Ray Data batch fn over a hash partition of band rows: its buckets' candidate pairs."""
    if batch.num_rows == 0 or "band" not in batch.column_names:
        return pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.int64())})
    p = bucket_pairs(*(batch[c].to_numpy() for c in ("band", "key", "order")))
    return pa.table({"a": p[:, 0], "b": p[:, 1]})


def rows_with_orders(batch: pa.Table, orders: np.ndarray) -> pa.Table:
    return batch.filter(pa.array(np.isin(batch["order"].to_numpy(), orders)))


def _near_dedup_distributed(sig_refs: list, cfg: DataConfig, n: int) -> np.ndarray:
    """Near-duplicate order keys without the driver holding every signature (`sig_refs`:
    (order, sig) blocks in the object store): banding and bucketing run as a Ray Data hash
    shuffle on (band, key); the driver gets the candidate pairs and the signatures of their
    documents only, then runs union-find on the pairs."""
    import ray
    import ray.data

    params = minhash_params(cfg)
    sigs = ray.data.from_arrow_refs(sig_refs)
    partitions = max(data_cpus(cfg), math.ceil(n * params.bands / 2_000_000))
    pairs = (
        sigs.map_batches(
            band_batch,
            fn_kwargs={"bands": params.bands, "num_perm": params.num_perm},
            batch_format="pyarrow",
        )
        .repartition(partitions, keys=["band", "key"])
        .map_batches(pairs_batch, batch_size=None, batch_format="pyarrow")
    )
    table = gather(pairs.to_arrow_refs())
    if table is None or table.num_rows == 0:
        return np.zeros(0, np.int64)
    p = np.stack([table["a"].to_numpy(), table["b"].to_numpy()], axis=1)
    need = np.unique(p)
    sub = gather(
        sigs.map_batches(
            rows_with_orders, fn_kwargs={"orders": need}, batch_format="pyarrow"
        ).to_arrow_refs()
    )
    orders = sub["order"].to_numpy()
    return near_duplicates_from_pairs(p, orders, _sig_matrix(sub, params.num_perm), params)


def _write_split(packed, split: str, cfg: DataConfig, labels: bool) -> dict:
    """Write one split's full blocks, then pack the tails in the driver and write them too."""
    cols = ["input_ids", "labels"] if labels else ["input_ids"]
    out = f"{cfg.output_dir}/{split}"
    tails = packed.map_batches(
        select_rows,
        fn_kwargs={"split": split, "is_tail": True, "columns": cols},
        batch_format="pyarrow",
    ).to_arrow_refs()

    tail_table = gather(tails)
    flats = {c: _flatten(tail_table, c) for c in cols}
    blocks = {c: split_blocks(flats[c], cfg.seq_len)[0] for c in cols}
    full = packed.map_batches(
        select_rows,
        fn_kwargs={"split": split, "is_tail": False, "columns": cols},
        batch_format="pyarrow",
    )
    full.write_parquet(out, filesystem=writer_filesystem(out), min_rows_per_file=cfg.shard_rows)
    n_tail = len(blocks["input_ids"])
    if n_tail:
        filesystem, path = filesystem_for(f"{out}/tail-blocks.parquet")
        pq.write_table(
            pa.table({c: list_column(blocks[c]) for c in cols}), path, filesystem=filesystem
        )
    return _split_summary(out, int(len(flats["input_ids"]) - n_tail * cfg.seq_len))


def gather(refs: list) -> pa.Table | None:
    """The blocks behind `refs` as one table. Empty blocks are skipped: Ray Data may emit a
    0-row block without the operator's columns."""
    import ray

    tables = ray.get(list(refs))
    full = [t for t in tables if t.num_rows]
    if full or not tables:
        return pa.concat_tables(full) if full else None
    return max(tables, key=lambda t: t.num_columns)


def _flatten(table: pa.Table | None, column: str) -> np.ndarray:
    if table is None or table.num_rows == 0:
        return np.zeros(0, np.int32)
    return table[column].combine_chunks().flatten().to_numpy().astype(np.int32)


def _split_summary(out: str, dropped: int) -> dict:
    from pyarrow import fs as pafs

    filesystem, path = filesystem_for(out)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    shards = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    blocks = sum(pq.ParquetFile(s, filesystem=filesystem).metadata.num_rows for s in shards)
    prefix = scheme_prefix(out)
    return {
        "blocks": blocks,
        "shards": [prefix + s for s in shards],
        "dropped_tail_tokens": dropped,
    }


def _clear_outputs(cfg: DataConfig) -> None:
    """A re-run replaces earlier shards instead of mixing with them."""
    from pyarrow import fs as pafs

    for sub in (*SPLITS, "quarantine"):
        filesystem, path = filesystem_for(f"{cfg.output_dir}/{sub}")
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            filesystem.delete_dir(path)


def _tokenizer_corpus(files: list[InputFile], cfg: DataConfig):
    """Good documents for tokenizer training, read in the driver up to tokenizer_train_mb, with
    PII redacted as in the shards (else a frequent address could become a vocabulary entry)."""
    from aigc_ray.data.readers import read_file_rows

    column = cfg.messages_column if cfg.format == "sft" else cfg.text_column
    pii = pii_rules(cfg)
    seen, limit = 0, cfg.tokenizer_train_mb * 1e6
    for f in files:
        for table in read_file_rows(f, column, cfg.text_mode, strict=False):
            texts = table.column("text").combine_chunks()
            for text in _redacted(texts, pii) if pii else texts.to_pylist():
                if text is None:
                    continue
                yield text
                seen += len(text)
                if seen >= limit:
                    return


def _redacted(texts: pa.Array, pii: PiiRules) -> list[str | None]:
    """Texts with PII redacted, or None for a row holding some when the action is drop.
    (Rows are redacted as plain text: SFT rows are not validated yet here.)"""
    redacted, found = redact_batch(texts, pii)
    holds = sum(found.values()) > 0
    drop = holds & (pii.action == "drop")
    return [None if d else t for t, d in zip(redacted, drop, strict=True)]


def prepare_tokenizer(cfg: DataConfig, files: list[InputFile]):
    """Load the configured tokenizer, or train a byte-level BPE on the corpus; save it."""
    import tempfile

    from aigc_ray.model import load_tokenizer, train_tokenizer

    remote = is_uri(cfg.output_dir)
    out = Path(tempfile.mkdtemp()) if remote else Path(cfg.output_dir) / "tokenizer"
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        tok.save_pretrained(str(out))
    else:
        tok = train_tokenizer(_tokenizer_corpus(files, cfg), cfg.vocab_size, out)
    if remote:
        upload_dir(out, f"{cfg.output_dir}/tokenizer")
    return tok


def tokenize_pool_size(cfg: DataConfig) -> int:
    """Concurrent tokenize tasks: every CPU of the cluster (up to 32).

    Their input is the materialized, cleaned dataset, so no read task competes for CPUs
    (tasks taking every CPU while reads are pending would starve them: GUIDE §5).
    """

    if cfg.num_tokenize_actors:
        return cfg.num_tokenize_actors
    return min(32, data_cpus(cfg))


def data_cpus(cfg: DataConfig) -> int:
    """CPUs the stage's own task pools use: the cluster's CPUs now, at most data.max_cpus. On
    an autoscaling cluster still at zero CPU workers it is max_cpus (the pending tasks make the
    autoscaler launch nodes for them), else 1."""
    import ray

    have = int(ray.cluster_resources().get("CPU", 0))
    if cfg.max_cpus:
        return min(have, cfg.max_cpus) if have else cfg.max_cpus
    return max(1, have)


_UDFS: dict[int, TokenizePackUDF] = {}


def tokenize_pack(batch: pa.Table, **kwargs) -> pa.Table:
    """Ray Data batch fn (tasks): TokenizePackUDF, built once per worker process and reused.

    Tasks instead of an actor pool: the read/clean tasks have already started the workers,
    so tokenization starts at once (starting a pool of actors cost ~2.5 s per run here).
    """
    key = hash(tuple(sorted(kwargs.items())))
    udf = _UDFS.get(key)
    if udf is None:
        # one Rust thread per task's CPU: two tasks x the default of one thread per core
        # oversubscribed the cores (12.4 s vs 10.9 s for the same tokens here)
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        _UDFS.clear()
        udf = _UDFS[key] = TokenizePackUDF(**kwargs)
    return udf(batch)


def tokenize_block(block: pa.Table, drop_orders: np.ndarray, rows: int, kwargs: dict):
    """Ray task: the kept rows of one cleaned block, tokenized and packed `rows` at a time."""
    kept = keep_rows(block, drop_orders)
    parts = [tokenize_pack(kept.slice(i, rows), **kwargs) for i in range(0, kept.num_rows, rows)]
    return pa.concat_tables(parts) if parts else tokenize_pack(kept, **kwargs)


def bounded_tasks(task, blocks: list, args: tuple, workers: int) -> list:
    """Submit `task(block, *args)` for each block ref, at most `workers` running at a time;
    the result refs in block order."""
    import ray

    results = []
    for block in blocks:
        if len(results) >= workers:
            ray.wait(results, num_returns=len(results) - workers + 1, fetch_local=False)
        results.append(task.remote(block, *args))
    return results


def _tokenized(cleaned, drops: np.ndarray, cfg: DataConfig, tok, kept: int):
    """Tokenize and pack the kept rows of the materialized cleaned dataset: one plain Ray task
    per block (see `candidate_signatures` for why not map_batches: the first seconds of every
    Ray Data execution run one task at a time here). Batches of at most batch_size rows and
    at least 16 batches over the corpus (so the workers finish together), a function of the
    data only: the packed output is the same for any number of workers."""
    import ray
    import ray.data

    kwargs = dict(
        tokenizer_json=tok.backend_tokenizer.to_str(),
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        seq_len=cfg.seq_len,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        fmt=cfg.format,
        packing=cfg.sft_packing,
        chat_template=getattr(tok, "chat_template", None),
    )
    rows = max(1, min(cfg.batch_size, math.ceil(kept / 16)))
    task = ray.remote(num_cpus=1)(tokenize_block)
    args = (ray.put(drops), rows, ray.put(kwargs))
    refs = bounded_tasks(task, cleaned.to_arrow_refs(), args, tokenize_pool_size(cfg))
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return ray.data.from_arrow_refs(refs)


def _data_error_behind(e: Exception) -> Exception:
    """The DataError behind a Ray task failure (strict mode), if there is one."""
    cause = getattr(e, "cause", None)
    while cause is not None and not isinstance(cause, DataError):
        cause = getattr(cause, "cause", None) or getattr(cause, "__cause__", None)
    if cause is None and "DataError" in str(e):
        msg = str(e).split("DataError: ")[-1].splitlines()[0]
        return DataError(msg)
    return cause or e


def _counts(meta: pa.Table) -> dict:
    status = Counter(meta["status"].to_pylist())
    return {
        "docs_read": meta.num_rows,
        "malformed": status.pop("malformed", 0),
        "filtered": {
            k.split(":", 1)[1]: v for k, v in sorted(status.items()) if k.startswith("filtered:")
        },
    }


def _pii_counts(meta: pa.Table, cfg: DataConfig) -> dict:
    """Findings per kind among the rows read (before filters and dedup), and how many rows
    held any."""
    pii = pii_rules(cfg)
    if pii is None:
        return {"enabled": False, "action": cfg.pii.action, "found": {}, "rows": 0}
    per_kind = {k: meta[f"pii_{k}"].to_numpy() for k in pii.kinds}
    rows = np.zeros(meta.num_rows, bool)
    for v in per_kind.values():
        rows |= v > 0
    return {
        "enabled": True,
        "action": pii.action,
        "found": {k: int(v.sum()) for k, v in per_kind.items()},
        "rows": int(rows.sum()),
    }


def run_preprocess(cfg: DataConfig) -> dict:
    """Run the whole data stage; write shards, quarantine, tokenizer and manifest.json.

    Raises DataError (strict mode) naming the file and line of the first bad row.
    """
    import ray
    import ray.data

    t0 = time.time()
    files = resolve_inputs(cfg)
    _clear_outputs(cfg)
    tok = prepare_tokenizer(cfg, files)
    ctx = ray.data.DataContext.get_current()
    opts = ctx.execution_options
    previous = opts.preserve_order, opts.resource_limits
    opts.preserve_order = True
    if cfg.max_cpus:  # also caps what Ray Data asks the cluster autoscaler for
        opts.resource_limits = opts.resource_limits.copy(cpu=cfg.max_cpus)
    try:
        return _run(cfg, files, tok, t0)
    finally:
        opts.preserve_order, opts.resource_limits = previous


def _run(cfg: DataConfig, files: list[InputFile], tok, t0: float) -> dict:

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    cleaned = _cleaned_dataset(files, cfg)
    if cfg.max_docs:
        cleaned = cleaned.limit(cfg.max_docs)
    try:
        cleaned = cleaned.materialize()
    except Exception as e:  # Ray wraps the UDF's DataError in a task error
        raise _data_error_behind(e) from None
    timings["read_clean_s"], tick = round(time.perf_counter() - tick, 2), time.perf_counter()
    log.debug("read/clean stats:\n%s", cleaned.stats())
    pii = pii_rules(cfg)
    pii_cols = [f"pii_{k}" for k in pii.kinds] if pii else []
    meta_cols = ["order", "status", "hash", *pii_cols]
    meta = gather(cleaned.select_columns(meta_cols).to_arrow_refs())
    counts = _counts(meta)
    counts["pii"] = _pii_counts(meta, cfg)
    drops, counts["exact_duplicates"], counts["near_duplicates"] = _dedup(meta, cleaned, cfg)
    timings["dedup_s"], tick = round(time.perf_counter() - tick, 2), time.perf_counter()
    packed = _tokenized(
        cleaned,
        drops,
        cfg,
        tok,
        counts["docs_read"] - counts["malformed"] - sum(counts["filtered"].values()) - len(drops),
    )
    timings["tokenize_pack_s"], tick = round(time.perf_counter() - tick, 2), time.perf_counter()
    log.debug("tokenize/pack stats:\n%s", packed.stats())
    manifest = _manifest(cfg, files, tok, counts, packed, cleaned, t0)
    manifest["timings"] = {**timings, "write_s": round(time.perf_counter() - tick, 2)}
    return manifest


def _manifest(cfg: DataConfig, files, tok, counts: dict, packed, cleaned, t0: float) -> dict:

    stats = gather(
        packed.map_batches(
            tail_stats,
            batch_format="pyarrow",
        ).to_arrow_refs()
    ).to_pandas()
    quarantine = cfg.quarantine_dir or f"{cfg.output_dir}/quarantine"
    if counts["malformed"]:
        cleaned.map_batches(quarantined, batch_format="pyarrow").write_parquet(
            quarantine, filesystem=writer_filesystem(quarantine)
        )
    labels = cfg.format == "sft"
    m = {
        "format": cfg.format,
        "input_files": len(files),
        "input_bytes": sum(f.size for f in files),
        "inputs": [f.path for f in files][:50] + (["..."] if len(files) > 50 else []),
        **counts,
        "docs_kept": int(stats["docs_kept"].sum()),
        "tokens": int(stats["tokens"].sum()),
        "tokens_per_split": {s: int(stats[stats["split"] == s]["tokens"].sum()) for s in SPLITS},
        "truncated_examples": int(stats["truncated"].sum()),
        "seq_len": cfg.seq_len,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "tokenizer_dir": f"{cfg.output_dir}/tokenizer",
        "quarantine_dir": quarantine if counts["malformed"] else None,
        "splits": {s: _write_split(packed, s, cfg, labels) for s in SPLITS},
    }
    m["seconds"] = round(time.time() - t0, 2)
    m["config"] = cfg.model_dump(mode="json")
    _write_json(m, f"{cfg.output_dir}/manifest.json")
    if not is_uri(cfg.output_dir):
        write_resolved(cfg, cfg.output_dir)
    log.info("data stage: %s", format_report(m))
    return m


def _write_json(obj: dict, uri: str) -> None:
    filesystem, path = filesystem_for(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write((json.dumps(obj, indent=2) + "\n").encode())


def read_manifest(data_dir: str) -> dict:
    """Load a shard directory's manifest.json, with a clear error when it is missing."""
    filesystem, path = filesystem_for(f"{data_dir}/manifest.json")
    try:
        with filesystem.open_input_stream(path) as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, OSError):
        raise DataError(
            f"no manifest.json in {data_dir}: run `aigc-ray preprocess` first or set train.data_dir"
        ) from None


def format_report(m: dict) -> str:
    """A short human-readable account of every row."""
    filtered = ", ".join(f"{k} {v}" for k, v in m["filtered"].items()) or "none"
    tr, va = m["splits"]["train"], m["splits"]["val"]
    return "\n".join(
        [
            f"read {m['docs_read']} rows from {m['input_files']} files "
            f"({m['input_bytes'] / 1e6:.1f} MB)",
            f"  malformed {m['malformed']} (quarantined: {m['quarantine_dir'] or '-'})",
            f"  filtered  {sum(m['filtered'].values())} ({filtered})",
            f"  exact duplicates {m['exact_duplicates']}, near duplicates {m['near_duplicates']}",
            f"  pii {_pii_line(m.get('pii'))}",
            f"  kept {m['docs_kept']} -> {m['tokens']:,} tokens",
            f"  train {tr['blocks']} blocks ({len(tr['shards'])} shards, "
            f"{tr['dropped_tail_tokens']} tail tokens dropped)",
            f"  val   {va['blocks']} blocks ({len(va['shards'])} shards, "
            f"{va['dropped_tail_tokens']} tail tokens dropped)",
        ]
    )


def _pii_line(pii: dict | None) -> str:
    if not pii or not pii["enabled"]:
        return "not looked for (data.pii.enabled: false)"
    found = ", ".join(f"{k} {v}" for k, v in pii["found"].items() if v) or "none found"
    verb = "replaced" if pii["action"] == "replace" else "rows dropped"
    return f"{found} in {pii['rows']} rows ({verb})"
