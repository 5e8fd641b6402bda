"""Data-stage throughput: aigc_ray (Ray Data) vs a Hugging Face `datasets` reference.

Both run read -> clean -> exact dedup -> tokenize -> pack -> parquet on the same jsonl corpus
(the stdlib source, tests included, in shards), with the same cleaning function, the same
hash, the same tokenizer and the same packing, on this machine, in one run. Reports tokens/s,
wall time and peak memory (RSS of the whole process tree) of each; then the cost of MinHash
near-dedup per million documents. Last line: one JSON object with the ratio.

    python benchmarks/bench_data.py [--copies 2] [--shards 16] [--repeat 3]

Both sides run without PII redaction (the reference has none; ours redacts by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from aigc_ray.config import load_config
from aigc_ray.data import stdlib_files
from aigc_ray.data.dedup import MinHashParams, near_duplicates, signatures, text_hash
from aigc_ray.data.pack import pack_tokens
from aigc_ray.data.quality import clean_text, doc_split
from aigc_ray.model import train_tokenizer

SEQ_LEN = 256


class PeakRSS:
    """Samples the RSS of this process and all its children (Ray workers, datasets' pool)."""

    def __enter__(self):
        self.peak, self._stop = 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        me = psutil.Process()
        while not self._stop:
            procs = [me, *me.children(recursive=True)]
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def write_corpus(out: Path, copies: int, shards: int) -> tuple[list[str], int]:
    docs = [Path(p).read_text(errors="replace") for p in stdlib_files(include_tests=True)]
    docs = docs * copies  # copies make exact duplicates for the dedup step to find
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(shards):
        f = out / f"part-{s:03d}.jsonl"
        f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[s::shards]))
        files.append(str(f))
    return files, len(docs)


# ---------------------------------------------------------------- reference: HF datasets


def _ref_clean(batch):
    texts = [clean_text(t) for t in batch["text"]]
    return {
        "text": texts,
        "hash": [text_hash(t) for t in texts],
        "split": [doc_split(t, 0.05) for t in texts],
    }


def run_reference(files: list[str], tok_dir: str, out: Path, procs: int) -> int:
    """datasets: load_dataset(json) -> map(clean) -> filter -> dedup -> map(tokenize) -> pack ->
    parquet."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    ds = load_dataset("json", data_files=files, split="train", cache_dir=str(out / "cache"))
    ds = ds.map(_ref_clean, batched=True, num_proc=procs)
    ds = ds.filter(lambda b: [len(t) >= 1 for t in b["text"]], batched=True, num_proc=procs)
    hashes = np.asarray(ds["hash"])
    _, first = np.unique(hashes, return_index=True)  # first occurrence of each hash
    ds = ds.select(np.sort(first))

    def tokenize(batch):
        return {"ids": tok(batch["text"], add_special_tokens=False)["input_ids"]}

    ds = ds.map(tokenize, batched=True, num_proc=procs, remove_columns=["text", "hash"])
    total = 0
    for split in ("train", "val"):
        part = ds.filter(
            lambda b, s=split: [x == s for x in b["split"]], batched=True, num_proc=procs
        )

        def pack(batch):
            blocks, _ = pack_tokens(batch["ids"], eos, SEQ_LEN)
            return {"input_ids": list(blocks)}

        packed = part.map(
            pack, batched=True, batch_size=1000, num_proc=procs, remove_columns=part.column_names
        )
        packed.to_parquet(str(out / f"{split}.parquet"))
        total += len(packed) * SEQ_LEN
    return total


# ---------------------------------------------------------------- ours


def run_ours(files: list[str], tok_dir: str, out: Path) -> tuple[int, dict]:
    from aigc_ray.data import run_preprocess

    cfg = load_config(
        None,
        [
            f"data.inputs={json.dumps(files)}",
            f"data.output_dir={out}",
            f"data.tokenizer={tok_dir}",
            f"data.seq_len={SEQ_LEN}",
            f"train.seq_len={SEQ_LEN}",
            "data.near_dedup=false",
            "data.pii.enabled=false",  # the reference redacts nothing: same steps on both sides
            "data.batch_size=512",
            "data.shard_rows=20000",
        ],
    ).data
    m = run_preprocess(cfg)
    blocks = sum(m["splits"][s]["blocks"] for s in ("train", "val"))
    return blocks * SEQ_LEN, m


def near_dedup_cost(docs: list[str]) -> dict:
    p = MinHashParams()
    t = time.perf_counter()
    sigs = signatures(docs, p)
    sig_s = time.perf_counter() - t
    t = time.perf_counter()
    near_duplicates(sigs, np.arange(len(docs)), p)
    lsh_s = time.perf_counter() - t
    per_m = 1e6 / len(docs)
    return {
        "docs": len(docs),
        "signature_s_per_million_docs_per_core": round(sig_s * per_m, 1),
        "lsh_s_per_million_docs_driver": round(lsh_s * per_m, 1),
    }


def _sig_blocks(docs: list[str], blocks: int):
    import pyarrow as pa

    return [
        pa.table(
            {
                "text": docs[k::blocks],
                "status": ["ok"] * len(docs[k::blocks]),
                "order": np.arange(k, len(docs), blocks, dtype=np.int64),
            }
        )
        for k in range(blocks)
    ]


def _sig_task(table):
    from aigc_ray.data.stage import candidate_signature_batch

    return candidate_signature_batch(table, np.zeros(0, np.int64), MinHashParams()).num_rows


def near_dedup_scaling(docs: list[str], workers: list[int], blocks: int = 16) -> dict:
    """Docs/s of the stage's signature step (`candidate_signatures`: Ray tasks) with 1 and
    2 workers, beside a process pool running the same batch function on the same blocks.

    The input is materialized first and one warm-up pass runs before timing, so worker start
    and block creation are not counted (both sides have warm workers).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import ray
    import ray.data

    from aigc_ray.data.stage import candidate_signatures

    tables = _sig_blocks(docs, blocks)
    ds = ray.data.from_arrow_refs([ray.put(t) for t in tables]).materialize()

    def run_ray(n: int) -> float:
        t = time.perf_counter()
        ray.get(candidate_signatures(ds, np.zeros(0, np.int64), MinHashParams(), workers=n))
        return time.perf_counter() - t

    def run_pool(pool, n: int) -> float:
        t = time.perf_counter()
        list(pool.map(_sig_task, tables, chunksize=1))
        return time.perf_counter() - t

    out = {}
    run_ray(max(workers))
    for n in workers:
        out[f"ray_{n}_workers_docs_per_s"] = round(len(docs) / run_ray(n), 1)
    for n in workers:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            run_pool(pool, n)  # warm-up: imports in every worker
            out[f"pool_{n}_workers_docs_per_s"] = round(len(docs) / run_pool(pool, n), 1)
    lo, hi = min(workers), max(workers)
    out["ray_scaling"] = round(
        out[f"ray_{hi}_workers_docs_per_s"] / out[f"ray_{lo}_workers_docs_per_s"], 2
    )
    out["pool_scaling"] = round(
        out[f"pool_{hi}_workers_docs_per_s"] / out[f"pool_{lo}_workers_docs_per_s"], 2
    )
    return out


def planted_quality() -> dict:
    """Recall and precision of near-dedup on planted near-duplicates, with banding in the
    driver and distributed (the stage's Ray Data hash shuffle)."""
    import pyarrow as pa
    import ray.data

    from aigc_ray.config import DataConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dedup_planted import planted_near_duplicates  # the tests' planted corpus

    from aigc_ray.data.stage import _near_dedup_distributed, candidate_signatures

    p = MinHashParams()
    docs, truth = planted_near_duplicates(p.threshold)
    order = np.arange(len(docs), dtype=np.int64)
    driver = set(np.flatnonzero(near_duplicates(signatures(docs, p), order, p)).tolist())
    table = pa.table({"text": docs, "status": ["ok"] * len(docs), "order": order})
    ds = ray.data.from_arrow(table).repartition(8).materialize()
    refs = candidate_signatures(ds, np.zeros(0, np.int64), p)
    dist = set(_near_dedup_distributed(refs, DataConfig(), len(docs)).tolist())
    out = {"planted_pairs": len(truth), "same_result": driver == dist}
    for name, found in (("driver", driver), ("distributed", dist)):
        tp = len(found & truth)
        out[f"{name}_recall"] = round(tp / len(truth), 3)
        out[f"{name}_precision"] = round(tp / max(1, len(found)), 3)
    return out


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return float(np.median(values)), float(min(values)), float(max(values))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="side-by-side runs; medians reported")
    args = ap.parse_args(argv)
    procs = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    files, n_docs = write_corpus(work / "corpus", args.copies, args.shards)
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    tok_dir = str(work / "tok")
    docs = [Path(p).read_text(errors="replace") for p in stdlib_files(include_tests=True)]
    train_tokenizer(docs[:400], 8192, tok_dir)

    # both sides' libraries imported before either timer (ours are imported at module load)
    import datasets  # noqa: F401
    import ray
    from transformers import AutoTokenizer  # noqa: F401

    t = time.perf_counter()
    ray.init(
        num_cpus=procs,
        include_dashboard=False,
        object_store_memory=2 * 1024**3,
        log_to_driver=False,
        logging_level="ERROR",
    )
    init_s = time.perf_counter() - t
    runs = []
    for r in range(args.repeat):
        with PeakRSS() as ref_mem:
            t = time.perf_counter()
            ref_tokens = run_reference(files, tok_dir, work / f"ref{r}", procs)
            ref_s = time.perf_counter() - t
        with PeakRSS() as our_mem:
            t = time.perf_counter()
            our_tokens, manifest = run_ours(files, tok_dir, work / f"ours{r}")
            our_s = time.perf_counter() - t
        scaling = near_dedup_scaling(docs, [1, procs])
        runs.append(
            {
                "ref_s": ref_s,
                "ours_s": our_s,
                "ratio": (our_tokens / our_s) / (ref_tokens / ref_s),
                "ref_rss": ref_mem.peak,
                "our_rss": our_mem.peak,
                **scaling,
            }
        )
        print(f"run {r + 1}: {json.dumps({k: round(v, 3) for k, v in runs[-1].items()})}")
    nd = near_dedup_cost(docs[:600])
    quality = planted_quality()
    ray.shutdown()

    def med(key):
        return _median_spread([run[key] for run in runs])

    print(
        f"\ncorpus: {n_docs} docs, {mb:.1f} MB jsonl in {len(files)} files, {procs} cores; "
        f"exact duplicates found by ours: {manifest['exact_duplicates']}; same steps on both "
        "sides (read, clean, exact dedup, tokenize, pack, parquet; no PII redaction, no "
        f"near-dedup); median of {args.repeat} run(s) [min..max]"
    )
    print(
        f"{'pipeline':<24}{'packed tokens':>15}{'seconds':>24}{'tokens/s':>12}{'peak RSS MB':>13}"
    )
    for name, tokens, key, rss in (
        ("datasets (reference)", ref_tokens, "ref_s", "ref_rss"),
        ("aigc_ray (Ray Data)", our_tokens, "ours_s", "our_rss"),
    ):
        m, lo, hi = med(key)
        print(
            f"{name:<24}{tokens:>15,}{m:>10.1f} [{lo:.1f}..{hi:.1f}]".ljust(63)
            + f"{tokens / m:>12,.0f}{med(rss)[0] / 1e6:>13,.0f}"
        )
    ratio = med("ratio")
    print(f"ratio ours/reference: {ratio[0]:.2f}x [{ratio[1]:.2f}..{ratio[2]:.2f}]")
    print(f"(ray.init {init_s:.1f} s not included)")
    print("\nnear-dedup signatures, docs/s (16 blocks of the stdlib corpus, warm workers)")
    print(f"{'':<34}{'1 worker':>10}{f'{procs} workers':>12}{'scaling':>20}")
    for name, pre in (
        ("ours (candidate_signatures, Ray)", "ray"),
        ("process pool (same function)", "pool"),
    ):
        one, two, sc = (
            med(f"{pre}_1_workers_docs_per_s"),
            med(f"{pre}_{procs}_workers_docs_per_s"),
            med(f"{pre}_scaling"),
        )
        print(f"{name:<34}{one[0]:>10.1f}{two[0]:>12.1f}{sc[0]:>8.2f}x [{sc[1]:.2f}..{sc[2]:.2f}]")
    print(f"near-dedup cost: {nd}")
    print(f"planted near-duplicates: {quality}")
    print(
        json.dumps(
            {
                "bench": "data",
                "ratio": round(ratio[0], 3),
                "ratio_min": round(ratio[1], 3),
                "ratio_max": round(ratio[2], 3),
                "repeat": args.repeat,
                "ours_s": round(med("ours_s")[0], 2),
                "ref_s": round(med("ref_s")[0], 2),
                "ours_tokens_per_s": round(our_tokens / med("ours_s")[0]),
                "ref_tokens_per_s": round(ref_tokens / med("ref_s")[0]),
                "ours_tokens": our_tokens,
                "ref_tokens": ref_tokens,
                "ours_peak_rss_mb": round(med("our_rss")[0] / 1e6),
                "ref_peak_rss_mb": round(med("ref_rss")[0] / 1e6),
                "ray_init_s": round(init_s, 1),
                "docs": n_docs,
                "near_dedup_scaling": {
                    "ray": round(med("ray_scaling")[0], 2),
                    "ray_min_max": [round(x, 2) for x in med("ray_scaling")[1:]],
                    "pool": round(med("pool_scaling")[0], 2),
                    "pool_min_max": [round(x, 2) for x in med("pool_scaling")[1:]],
                },
                "near_dedup": nd,
                "planted": quality,
                "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs],
                "targets_met": ratio[0] >= 1.5
                and med("ray_scaling")[0] >= 1.6
                and min(quality[k] for k in quality if k.endswith(("recall", "precision"))) >= 0.95,
            }
        )
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
