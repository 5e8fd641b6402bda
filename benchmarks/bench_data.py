"""Data-stage throughput: aigc_ray (Ray Data) vs a Hugging Face `datasets` reference.

Both run read -> clean -> exact dedup -> tokenize -> pack -> parquet on the same jsonl corpus
(the stdlib source, tests included, in shards), with the same cleaning function, the same
hash, the same tokenizer and the same packing, on this machine, in one run. Reports tokens/s,
wall time and peak memory (RSS of the whole process tree) of each; then the cost of MinHash
near-dedup per million documents. Last line: one JSON object with the ratio.

    python benchmarks/bench_data.py [--copies 2] [--shards 16]
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


def _sig_batch(batch, params):
    import pyarrow as pa

    sigs = signatures(batch.column("text").to_pylist(), params)
    return pa.table({"n": [len(sigs)]})


def near_dedup_scaling(docs: list[str], workers: list[int]) -> dict:
    """Docs/s of MinHash signatures in Ray Data tasks, by number of concurrent tasks.

    The input is materialized first and one warm-up pass runs before timing, so worker start
    and block creation are not counted.
    """
    import ray.data
    from ray.data import TaskPoolStrategy

    ds = ray.data.from_items([{"text": d} for d in docs], override_num_blocks=32).materialize()

    def run(n: int) -> float:
        t = time.perf_counter()
        ds.map_batches(
            _sig_batch,
            fn_kwargs={"params": MinHashParams()},
            batch_format="pyarrow",
            compute=TaskPoolStrategy(size=n),
        ).materialize()
        return time.perf_counter() - t

    run(max(workers))
    return {f"{n}_workers_docs_per_s": round(len(docs) / run(n), 1) for n in workers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--shards", type=int, default=16)
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
    from transformers import AutoTokenizer  # noqa: F401

    with PeakRSS() as ref_mem:
        t = time.perf_counter()
        ref_tokens = run_reference(files, tok_dir, work / "ref", procs)
        ref_s = time.perf_counter() - t

    import ray

    t = time.perf_counter()
    ray.init(
        num_cpus=procs,
        include_dashboard=False,
        object_store_memory=2 * 1024**3,
        log_to_driver=False,
        logging_level="ERROR",
    )
    init_s = time.perf_counter() - t
    with PeakRSS() as our_mem:
        t = time.perf_counter()
        our_tokens, manifest = run_ours(files, tok_dir, work / "ours")
        our_s = time.perf_counter() - t
    nd = near_dedup_cost(docs[:600])
    nd["ray_data_scaling"] = near_dedup_scaling(docs, [1, procs])
    ray.shutdown()

    ref_tps, our_tps = ref_tokens / ref_s, our_tokens / our_s
    rows = [
        ("datasets (reference)", ref_tokens, ref_s, ref_tps, ref_mem.peak),
        ("aigc_ray (Ray Data)", our_tokens, our_s, our_tps, our_mem.peak),
    ]
    print(
        f"\ncorpus: {n_docs} docs, {mb:.1f} MB jsonl in {len(files)} files, {procs} cores; "
        f"exact duplicates found by ours: {manifest['exact_duplicates']}"
    )
    print(
        f"{'pipeline':<24}{'packed tokens':>15}{'seconds':>10}{'tokens/s':>12}{'peak RSS MB':>13}"
    )
    for name, tokens, secs, tps, peak in rows:
        print(f"{name:<24}{tokens:>15,}{secs:>10.1f}{tps:>12,.0f}{peak / 1e6:>13,.0f}")
    print(f"(ray.init {init_s:.1f} s not included)")
    print(f"near-dedup cost: {nd}")
    ratio = our_tps / ref_tps
    print(
        json.dumps(
            {
                "bench": "data",
                "ratio": round(ratio, 3),
                "ours_tokens_per_s": round(our_tps),
                "ref_tokens_per_s": round(ref_tps),
                "ours_s": round(our_s, 2),
                "ref_s": round(ref_s, 2),
                "ours_tokens": our_tokens,
                "ref_tokens": ref_tokens,
                "ours_peak_rss_mb": round(our_mem.peak / 1e6),
                "ref_peak_rss_mb": round(ref_mem.peak / 1e6),
                "ray_init_s": round(init_s, 1),
                "docs": n_docs,
                "near_dedup": nd,
            }
        )
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
